"""`moelab plan`: what a run needs per GPU under FSDP2 + expert parallelism, before renting the cluster.

Layout (as `trainers/parallel.py` builds it): W GPUs in a mesh (dp_shard = W / ep, ep); every GPU is a
data-parallel rank with b sequences of s tokens per micro-step; a global batch of B sequences takes
n_acc = B / (W b) micro-steps; FSDP reduces gradients after every micro-step.

Symbols: P total parameters, P_e routed-expert parameters, P_n = P - P_e; L layers, L_moe MoE layers (MoE blocks
of MTP modules included); d model width, E routed experts, k top-k, d_e expert width, d_s total shared-expert
width, H / H_kv query / key-value heads, q = H x head_dim, kv = H_kv x head_dim, V vocabulary; MLA: qk = H x
(qk_nope + qk_rope), v = H x v_head_dim, n = qk_nope, r_q / r_kv / r the query latent, KV latent and rope widths;
D = mtp_depth (an MTP module counts as one more block). Precision: bf16 compute (2 bytes), fp32 master weights,
gradients and AdamW moments (4 bytes each).

Memory per GPU (bytes). Experts are split over ep and their slices sharded over dp, so every parameter is
spread over all W GPUs:
- params        4 P / W
- grads         4 P / W
- optimizer     8 P / W                     (AdamW exp_avg + exp_avg_sq)
- gathered      2 (P_root + 2 P_block)      bf16 all-gather buffers: the root (embeddings, head, final norm,
                                            kept gathered through the step) and one block plus the next one
                                            prefetched; P_block = largest block's non-expert parameters +
                                            its expert parameters / ep
- activations   b s x A                     A = bytes per token that autograd keeps for the backward
                                            (`activation_bytes`, below)
- loss logits   b s x 6 V                   transient at the loss: bf16 logits and their fp32 copy

Activations: what autograd saves, counted tensor by tensor from the code as it runs (bf16 compute, FSDP's bf16
parameters; fp32 where the model computes in fp32), one storage counted once however many views of it are
saved, parameters and buffers excluded (they are the gathered parameters above). Per token; N(n) = 6n + 4 is
what an RMSNorm over n features keeps besides its output (fp32 copy of the input 4n, fp32 reciprocal RMS 4,
bf16 normalised input 2n); an output saved by its consumer is counted once, with the consumer.
  block          N(d) + 2d + attention + N(d) + FFN           attention norm and its output; attention; FFN norm
  GQA            4q + 4kv + 4H (+ 2q on CPU)                  q, k (after RoPE), v, output; fp32 logsumexp per
                 QK-norm full: + N(q) + N(kv)                 head. The fused SDPA kernels of CUDA return the
                 QK-norm head: + 6q + 4H + 6kv + 4H_kv        output in [B, S, H, hd] layout, so `wo` saves a view
                                                              of it; the CPU flash kernel's [B, H, S, hd] output
                                                              is copied by the reshape before `wo`.
  MLA            4 qk + 2(H n + v) + 2v + 4H (+ 2v on CPU)    q, k (RoPE part joined), the kv up-projection's
                 + N(r_kv) + 2 r_kv (+ N(r_q) + 2 r_q)        output (v is a view of it, k_nope beside it),
                                                              output, logsumexp; the KV latent's norm and output
                                                              (and the query latent's). On CPU SDPA needs
                                                              v_head_dim = qk_nope + qk_rope for its fused kernel.
  dense FFN      2d + 8 d_ff                                  its input (the FFN norm's output), gate/up output
                                                              (4 d_ff), silu(gate), its product
  MoE FFN        [2d] + router + k x slot + shared            its input where saved: by shared experts, or by the
                                                              Triton kernel without EP (the fp32 router keeps an
                                                              fp32 copy; the reference kernel and EP dispatch
                                                              their own gathered rows)
    router       4d + 8E + 8k + 4 (+ 4k + 4 renormalised)     fp32 input copy, fp32 logits and scores, top-k ids
                 (+ 4 sigmoid)                                (int64), z-loss logsumexp; renormalised gates and
                                                              their sum; the sigmoid scores' sum
    slot (CUDA, Triton kernels)  6 d_e + 10                   h = [gate, up] and a = silu(gate) up (bf16), the
                                                              gate (bf16), sorted slot ids and their block-padded
                                                              copy (int32); x and the ids are saved elsewhere
    slot (CPU, reference kernel) 4d + 6 d_e + 26              h, a, the gate; the gathered rows xs and the
                                                              per-slot outputs y (bf16), three int64 index lists
    EP on, CUDA  4d + 6 d_e + 34                              the dispatch's token and order indices (int64); the
    EP on, CPU   6d + 6 d_e + 44                              kernel on the received rows (their expert ids int64,
                                                              gates; CPU: the kernel's slot terms, CUDA: the rows
                                                              themselves, 2d, and its slot terms); the returned
                                                              rows, which the combine's index_add saves (2d).
                                                              Received = sent slots, summed over the EP group.
    shared       8 d_s (+ 2d + 2 with a shared gate)          a SwiGLU of the total shared width
    capacity drops: + 8k (the capacity-limited ids kept in MoE.stats); slots assumed all kept
  head           8 + N(d) + 2d + 4V + 8                       token ids (int64), final norm, fp32 log-softmax,
                                                              targets (int64)
  MTP depth      2 N(d) + 4d + block + N(d) + 2d + 4V + 8     embedding and hidden norms, their concatenation (the
                                                              projection's input), a block, the output norm, the
                                                              head's log-softmax and targets
With activation checkpointing (`trainers/ac.py`):
  full           block: 2d (+ 8k for MoE)                     its input; the routing MoE.stats keeps
                 MTP depth: 2d (+ 8k) + 2d + 4V + 8           its input h, its output norm's output, the head
  selective      block: 6d + FFN                              the inputs of the attention norm, the attention
                                                              sub-layer and the FFN norm
                 head: 8 + 4d + 4V + 8; MTP depth: 8d + block + 4V + 8
Recomputation costs FLOPs: full one forward of every block and MTP module (2 x active non-embedding params +
1/3 of the attention term per token), and under EP one more dispatch and combine (all-to-all bytes x 1.5);
selective one forward of every attention sub-layer (2 x its params + 2 s H (qk + v) per layer). Not counted:
transients other than the loss logits (e.g. a backward's gradient buffers), allocator fragmentation.

All-to-all bytes sent per GPU per step: 4 x n_acc x L_moe x b s k d x (ep-1)/ep x 2. Each MoE layer sends
every slot's d-vector out and back in the forward (dispatch, combine) and both again in the backward; under
uniform routing a share (ep-1)/ep of slots is owned by another GPU. Full activation checkpointing: 6, not 4
(the recomputed forward dispatches and combines again).

FSDP bytes sent per GPU per step: n_acc x (2 + 2 + 4) x (P_n (W-1)/W + (P_e/ep) (dp-1)/dp): a ring
all-gather of bf16 parameters in the forward and again in the backward, a reduce-scatter of fp32 gradients.

FLOPs per step: flops_per_token(s) x B s (`ModelConfig.flops_per_token`: 6 x active matmul params +
attention); per GPU / W.

Time per step: t_compute = (FLOPs + recomputed FLOPs) per GPU / (MFU x peak); t_a2a = all-to-all bytes /
bandwidth, on the critical path (experts wait for their tokens); t_fsdp = FSDP bytes / bandwidth, hidden behind
compute by prefetching, so only its excess counts: step = t_compute + t_a2a + max(0, t_fsdp - t_compute).
Bandwidth: a group of consecutive GPUs inside one node uses NVLink (`nvlink_gbps`), otherwise the network
(`bw_gbps` per GPU). An EP group is `ep` consecutive ranks; FSDP groups span all W ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.trainers.ac import MODES as AC_MODES
from moelab.trainers.config import ConfigError, ModelConfig, RunConfig

GIB = 2**30


@dataclass
class PlanInputs:
    gpus: int
    ep: int = 1
    seq: int = 0  # 0 = the preset's train.seq_len
    micro_batch: int = 0  # sequences per GPU per micro-step; 0 = the preset's micro batch
    batch: int = 0  # global sequences per step; 0 = the preset's train.batch_size
    mfu: float = 0.4
    peak_tflops: float = 989.0  # dense bf16 peak per GPU: H100 SXM (as in trainers/hardware.py)
    bw_gbps: float = 400.0  # network bandwidth per GPU, Gbit/s (one 400G InfiniBand NIC per GPU)
    nvlink_gbps: float = 3600.0  # intra-node bandwidth per GPU, Gbit/s (H100 NVLink: 450 GB/s)
    gpus_per_node: int = 8
    activation_checkpointing: str = ""  # "" = the preset's train.activation_checkpointing; none|selective|full


def _block_params(rc: RunConfig, layer: int) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of block `layer`; layers n_layers .. n_layers + mtp_depth - 1 are
    the MTP modules (their block plus their own norms and projection: two FSDP units, counted as one)."""
    m = rc.model
    if layer < m.n_layers:
        total, _, routed, _ = m.block_params(m.is_moe_layer(layer))
        return total - routed, routed
    total, _ = m.mtp_params()
    routed = m.block_params(True)[2] if m.mtp_is_moe else 0
    return total - routed, routed


def _norm(n: int) -> int:
    """What an RMSNorm over n features keeps besides its output: fp32 input copy, fp32 1/rms, bf16 x/rms."""
    return 6 * n + 4


def _attention_bytes(m: ModelConfig, device: str) -> int:
    """Attention sub-layer, per token, without its input norm (module docstring: GQA, MLA)."""
    H = m.n_heads
    if m.attention == "mla":
        qk, v = H * m.qk_dim, H * m.v_dim
        out = 4 * qk + 2 * H * (m.qk_nope_dim + m.v_dim) + 2 * v + 4 * H + _norm(m.kv_rank) + 2 * m.kv_rank
        if m.q_lora_rank:
            out += _norm(m.q_lora_rank) + 2 * m.q_lora_rank
        return out + (2 * v if device == "cpu" else 0)
    q, kv = H * m.hd, m.kv_heads * m.hd
    out = 4 * q + 4 * kv + 4 * H
    if m.qk_norm == "full":
        out += _norm(q) + _norm(kv)
    elif m.qk_norm == "head":
        out += 6 * q + 4 * H + 6 * kv + 4 * m.kv_heads
    return out + (2 * q if device == "cpu" else 0)


def expert_slot_bytes(m: ModelConfig, ep: bool = False, device: str = "cuda") -> int:
    """Bytes kept per routed slot by the expert computation (and, with EP, its dispatch and combine); the
    module docstring says which tensors. The expert kernels' saved tensors: `reference._MoEExperts` (CPU),
    `triton_moe._TritonMoE` (CUDA)."""
    d, de = m.d_model, m.d_expert
    if device == "cpu":
        return 6 * d + 6 * de + 44 if ep else 4 * d + 6 * de + 26
    return 4 * d + 6 * de + 34 if ep else 6 * de + 10


def _ffn_bytes(m: ModelConfig, moe: bool, ep: bool, device: str) -> int:
    """FFN per token: dense SwiGLU, or router + routed slots + shared experts; with its input (the FFN norm's
    output) where something saves it: the dense or shared SwiGLU's first matmul, the Triton kernel without EP.
    (The fp32 router saves an fp32 copy, the reference kernel and EP dispatch their own gathered rows.)"""
    d = m.d_model
    if not moe:
        return 2 * d + 8 * m.d_ff
    mo, k, de = m.moe, m.moe.top_k, m.d_expert
    saved_input = 2 * d if mo.n_shared or (device == "cuda" and not ep) else 0
    router = 4 * d + 8 * mo.n_experts + 8 * k + 4
    router += (4 * k + 4 if mo.renormalize else 0) + (4 if mo.score_func == "sigmoid" else 0)
    slot = expert_slot_bytes(m, ep, device)
    shared = 8 * m.d_shared_total + (2 * d + 2 if mo.shared_gate else 0)
    return saved_input + router + k * slot + shared + (8 * k if mo.capacity_factor > 0 else 0)


def _block_bytes(m: ModelConfig, moe: bool, ep: bool, ac: str, device: str) -> int:
    d = m.d_model
    if ac == "full":
        return 2 * d + (8 * m.moe.top_k if moe else 0)
    ffn = _ffn_bytes(m, moe, ep, device)
    if ac == "selective":  # the inputs of the attention norm, the attention and the FFN norm
        return 6 * d + ffn
    return _norm(d) + 2 * d + _attention_bytes(m, device) + _norm(d) + ffn


def activation_bytes(m: ModelConfig, *, ep: bool = False, ac: str = "none", device: str = "cuda") -> dict:
    """Bytes per token that autograd keeps for the backward (formulas in the module docstring).

    ep: expert parallelism on (ep > 1: dispatch and combine buffers); ac: `train.activation_checkpointing`
    ("none", "selective", "full"); device: "cuda" (Triton expert kernels, fused SDPA: what a GPU run uses) or
    "cpu" (the reference expert kernel, the CPU flash SDPA). Returns {"layers": [per main block], "head": the
    embedding ids, final norm and loss, "mtp": [per MTP depth], "total": their sum}.
    """
    if ac not in AC_MODES:
        raise ConfigError(f"--activation-checkpointing: got {ac!r}; allowed: {', '.join(AC_MODES)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"activation_bytes device: got {device!r}; allowed: 'cuda', 'cpu'")
    d, V = m.d_model, m.vocab_size
    layers = [_block_bytes(m, m.is_moe_layer(i), ep, ac, device) for i in range(m.n_layers)]
    loss = 4 * V + 8  # fp32 log-softmax, int64 targets (a copy: the shifted tokens are not contiguous)
    head = 8 + (4 * d if ac == "selective" else _norm(d) + 2 * d) + loss
    block = _block_bytes(m, m.mtp_is_moe, ep, ac, device)
    if ac == "full":
        # the whole module is one region: its input h (its emb input is block 0's saved input), the routing
        # MoE.stats keeps, out_norm's output (saved by the head)
        depth = 2 * d + (8 * m.moe.top_k if m.mtp_is_moe else 0) + 2 * d + loss
    elif ac == "selective":
        # the concatenated norm outputs; out_norm's input and output. The h and emb inputs of the checkpointed
        # embedding / hidden norms are saved already (the final norm's or the previous out_norm's input, block 0's)
        depth = 4 * d + block + 4 * d + loss
    else:
        depth = 2 * _norm(d) + 4 * d + block + _norm(d) + 2 * d + loss
    mtp = [depth] * m.mtp_depth
    return {"layers": layers, "head": head, "mtp": mtp, "total": sum(layers) + head + sum(mtp)}


def recompute_flops_per_token(m: ModelConfig, seq: int, ac: str) -> float:
    """Forward FLOPs per token that activation checkpointing `ac` runs again in the backward."""
    if ac == "none":
        return 0.0
    attention = 2.0 * (m.n_layers + m.mtp_depth) * seq * m.n_heads * (m.qk_dim + m.v_dim)  # scores, values
    if ac == "selective":
        return 2.0 * (m.n_layers + m.mtp_depth) * m.attention_params() + attention
    return 2.0 * m.param_counts()["active_non_embedding"] + attention


def make_plan(rc: RunConfig, p: PlanInputs) -> dict:
    """The figures of one layout; ConfigError (naming the flag) for a layout that cannot work."""
    m, t = rc.model, rc.train
    W, ep = p.gpus, p.ep
    if W < 1:
        raise ConfigError(f"--gpus: got {W}; allowed: a positive integer")
    if ep < 1:
        raise ConfigError(f"--ep: got {ep}; allowed: a positive integer")
    if ep > 1 and not m.moe.enabled:
        raise ConfigError(f"--ep: got {ep}; allowed: 1 for the dense preset {rc.preset!r}")
    wrong = []
    if ep > 1 and m.moe.n_experts % ep:
        wrong.append(f"a divisor of the preset's model.moe.n_experts={m.moe.n_experts}")
    if W % ep:
        wrong.append(f"a divisor of --gpus={W}")
    if wrong:
        raise ConfigError(f"--ep: got {ep}; allowed: " + " and ".join(wrong) + f" (preset {rc.preset!r})")
    if not 0 < p.mfu <= 1:
        raise ConfigError(f"--mfu: got {p.mfu}; allowed: a fraction in (0, 1]")
    if p.bw_gbps <= 0 or p.nvlink_gbps <= 0 or p.peak_tflops <= 0 or p.gpus_per_node < 1:
        raise ConfigError("--bw-gbps/--nvlink-gbps/--peak-tflops/--gpus-per-node: allowed: positive numbers")
    ac = p.activation_checkpointing or t.activation_checkpointing
    if ac not in AC_MODES:
        raise ConfigError(f"--activation-checkpointing: got {ac!r}; allowed: {', '.join(AC_MODES)}")
    s = p.seq or t.seq_len
    if s > m.max_seq_len:
        raise ConfigError(f"--seq: got {s}; allowed: <= model.max_seq_len={m.max_seq_len}")
    b = p.micro_batch or t.micro
    B = p.batch or t.batch_size
    if b < 1 or B < 1:
        raise ConfigError(f"--batch / --micro-batch: got {B} / {b}; allowed: positive integers")
    if B % (W * b):
        fits = [mb for mb in range(1, B // W + 1) if B % (W * mb) == 0]
        allowed = ([f"--micro-batch in {fits}"] if fits else []) + [f"--batch a multiple of {W * b}"]
        raise ConfigError(f"--batch / --micro-batch: a global batch of {B} sequences does not split into {W} "
                          f"GPUs x {b} sequences per micro-step; allowed: " + ", or ".join(allowed))
    dp = W // ep
    n_acc = B // (W * b)
    pc = m.param_counts()
    P, P_e = pc["total"], pc["routed_experts"]
    P_n = P - P_e
    L_moe = sum(1 for i in range(m.n_layers) if m.is_moe_layer(i)) + (m.mtp_depth if m.mtp_is_moe else 0)

    # memory per GPU
    params_b = 4 * P / W
    grads_b = 4 * P / W
    optim_b = 8 * P / W
    blocks = [_block_params(rc, i) for i in range(m.n_layers + m.mtp_depth)]
    P_block = max(n + e / ep for n, e in blocks)
    P_root = P - sum(n + e for n, e in blocks)
    gathered_b = 2 * (P_root + 2 * P_block)
    act = activation_bytes(m, ep=ep > 1, ac=ac, device="cuda")
    act_b = b * s * act["total"]
    logits_b = b * s * 6 * m.vocab_size
    total_b = params_b + grads_b + optim_b + gathered_b + act_b + logits_b

    # communication per GPU per step
    # Full AC dispatches and combines again in the backward's recomputation: 6 transfers per layer, not 4.
    a2a_b = (6 if ac == "full" else 4) * n_acc * L_moe * b * s * m.moe.top_k * m.d_model * (ep - 1) / ep * 2
    fsdp_b = n_acc * (2 + 2 + 4) * (P_n * (W - 1) / W + (P_e / ep) * (dp - 1) / dp)
    net, nvl = p.bw_gbps * 1e9 / 8, p.nvlink_gbps * 1e9 / 8  # bytes/s
    a2a_bw = nvl if ep <= p.gpus_per_node else net
    fsdp_bw = nvl if W <= p.gpus_per_node else net

    # compute and time
    fpt = m.flops_per_token(s)
    flops = fpt * B * s
    recompute = recompute_flops_per_token(m, s, ac) * B * s
    t_compute = (flops + recompute) / W / (p.mfu * p.peak_tflops * 1e12)
    t_a2a = a2a_b / a2a_bw
    t_fsdp = fsdp_b / fsdp_bw
    step = t_compute + t_a2a + max(0.0, t_fsdp - t_compute)
    return {
        "preset": rc.preset, "gpus": W, "ep": ep, "dp_shard": dp, "seq": s, "micro_batch": b, "batch": B,
        "grad_accum": n_acc, "tokens_per_step": B * s, "params_total": P, "params_experts": P_e,
        "params_active": pc["active"],
        "mem_params_gib": params_b / GIB, "mem_grads_gib": grads_b / GIB, "mem_optim_gib": optim_b / GIB,
        "mem_gathered_gib": gathered_b / GIB, "mem_activations_gib": act_b / GIB, "mem_logits_gib": logits_b / GIB,
        "mem_total_gib": total_b / GIB, "activation_checkpointing": ac, "act_bytes_per_token": act["total"],
        "flops_recompute_per_step": recompute,
        "a2a_bytes_per_step": a2a_b, "fsdp_bytes_per_step": fsdp_b,
        "flops_per_token": fpt, "flops_per_step": flops, "flops_per_gpu_step": flops / W,
        "t_compute_s": t_compute, "t_a2a_s": t_a2a, "t_fsdp_s": t_fsdp, "step_time_s": step,
        "tokens_per_s": B * s / step, "inputs": asdict(p),
    }


def format_plan(r: dict) -> str:
    """The human-readable report of `make_plan`."""
    def h(n: float) -> str:
        for unit, sc in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(n) >= sc:
                return f"{n / sc:.2f}{unit}"
        return f"{n:.0f}"

    i = r["inputs"]
    lines = [
        f"{r['preset']} on {r['gpus']} GPUs: ep {r['ep']} x dp_shard {r['dp_shard']}; seq {r['seq']}, "
        f"micro-batch {r['micro_batch']}/GPU, batch {r['batch']} seqs ({h(r['tokens_per_step'])} tokens), "
        f"grad accumulation {r['grad_accum']}",
        f"params: {h(r['params_total'])} total ({h(r['params_experts'])} routed experts), "
        f"{h(r['params_active'])} active",
        "",
        "memory per GPU (GiB)",
        f"  params (fp32, sharded)        {r['mem_params_gib']:9.2f}",
        f"  grads (fp32, sharded)         {r['mem_grads_gib']:9.2f}",
        f"  AdamW states (fp32, sharded)  {r['mem_optim_gib']:9.2f}",
        f"  gathered params (bf16)        {r['mem_gathered_gib']:9.2f}",
        f"  {'activations (AC ' + r['activation_checkpointing'] + ')':30}{r['mem_activations_gib']:9.2f}  "
        f"({h(r['act_bytes_per_token'])}B per token kept for the backward)",
        f"  loss logits (transient)       {r['mem_logits_gib']:9.2f}",
        f"  total                         {r['mem_total_gib']:9.2f}",
        "",
        "per step",
        f"  FLOPs                         {h(r['flops_per_step'])}  ({h(r['flops_per_gpu_step'])} per GPU)"
        + (f", + {h(r['flops_recompute_per_step'])} recomputed" if r["flops_recompute_per_step"] else ""),
        f"  all-to-all bytes sent / GPU   {h(r['a2a_bytes_per_step'])}B",
        f"  FSDP bytes sent / GPU         {h(r['fsdp_bytes_per_step'])}B",
        f"  compute at MFU {i['mfu']:.0%}           {r['t_compute_s'] * 1e3:9.1f} ms  "
        f"(peak {i['peak_tflops']:.0f} TFLOP/s)",
        f"  all-to-all                    {r['t_a2a_s'] * 1e3:9.1f} ms  "
        f"({'NVLink' if r['ep'] <= i['gpus_per_node'] else 'network'})",
        f"  FSDP (overlapped)             {r['t_fsdp_s'] * 1e3:9.1f} ms  "
        f"({'NVLink' if r['gpus'] <= i['gpus_per_node'] else 'network'})",
        f"  step time                     {r['step_time_s'] * 1e3:9.1f} ms  -> {h(r['tokens_per_s'])} tokens/s",
    ]
    return "\n".join(lines)
