"""`moelab plan`: what a run needs per GPU under FSDP2 + expert parallelism, before renting the cluster.

Layout (as `trainers/parallel.py` builds it): W GPUs in a mesh (dp_shard = W / ep, ep); every GPU is a
data-parallel rank with b sequences of s tokens per micro-step; a global batch of B sequences takes
n_acc = B / (W b) micro-steps; FSDP reduces gradients after every micro-step.

Symbols: P total parameters, P_e routed-expert parameters, P_n = P - P_e; L layers, L_moe MoE layers (MoE blocks
of MTP modules included); d model width, E routed experts, k top-k, d_e expert width, d_s total shared-expert
width, q = n_heads x head_dim, kv = n_kv_heads x head_dim, V vocabulary; MLA: qk = n_heads x (qk_nope + qk_rope),
v = n_heads x v_head_dim, r_q / r_kv / r the query latent, KV latent and rope widths; D = mtp_depth (an MTP
module counts as one more block). Precision: bf16 compute (2 bytes), fp32 master weights, gradients and AdamW
moments (4 bytes each).

Memory per GPU (bytes). Experts are split over ep and their slices sharded over dp, so every parameter is
spread over all W GPUs:
- params        4 P / W
- grads         4 P / W
- optimizer     8 P / W                     (AdamW exp_avg + exp_avg_sq)
- gathered      2 (P_root + 2 P_block)      bf16 all-gather buffers: the root (embeddings, head, final norm,
                                            kept gathered through the step) and one block plus the next one
                                            prefetched; P_block = largest block's non-expert parameters +
                                            its expert parameters / ep
- activations   b s (L_attn_ffn + head      an estimate, no activation recomputation, per token:
                  + D mtp)
                attention  2 (2d + 2q + 2kv)               norm in/out, q, k, v, attention output
                MLA        2 (2d + 2qk + 2v + 2r_q + 2r_kv + r)
                                                           norm in/out, q, k, v, attention output; the query
                                                           latent and its norm, the KV latent with the rope key
                                                           and its norm
                MoE FFN    2 (2d + k (2d + 2d_e) + 3 d_s) + 16 E
                                                           norm in/out; per slot the dispatched row, the
                                                           expert output, gate/up pre-activations; shared
                                                           experts; router logits + probabilities in fp32
                dense FFN  2 (2d + 3 d_ff)
                head       4d + 10 V                       final norm; bf16 logits, fp32 copy, fp32 log-softmax
                MTP        2 (5d) + attention + FFN + head
                                                           per depth: embedding and hidden norms in/out, the
                                                           projection's output, a block, the shared head again

All-to-all bytes sent per GPU per step: 4 x n_acc x L_moe x b s k d x (ep-1)/ep x 2. Each MoE layer sends
every slot's d-vector out and back in the forward (dispatch, combine) and both again in the backward; under
uniform routing a share (ep-1)/ep of slots is owned by another GPU.

FSDP bytes sent per GPU per step: n_acc x (2 + 2 + 4) x (P_n (W-1)/W + (P_e/ep) (dp-1)/dp): a ring
all-gather of bf16 parameters in the forward and again in the backward, a reduce-scatter of fp32 gradients.

FLOPs per step: flops_per_token(s) x B s (`ModelConfig.flops_per_token`: 6 x active matmul params +
attention); per GPU / W.

Time per step: t_compute = FLOPs per GPU / (MFU x peak); t_a2a = all-to-all bytes / bandwidth, on the
critical path (experts wait for their tokens); t_fsdp = FSDP bytes / bandwidth, hidden behind compute by
prefetching, so only its excess counts: step = t_compute + t_a2a + max(0, t_fsdp - t_compute).
Bandwidth: a group of consecutive GPUs inside one node uses NVLink (`nvlink_gbps`), otherwise the network
(`bw_gbps` per GPU). An EP group is `ep` consecutive ranks; FSDP groups span all W ranks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.trainers.config import ConfigError, RunConfig

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


def _act_bytes_per_token(rc: RunConfig) -> float:
    """Activation bytes kept for the backward per token (see the module docstring)."""
    m = rc.model
    d, V = m.d_model, m.vocab_size
    if m.attention == "mla":
        qk, v = m.n_heads * m.qk_dim, m.n_heads * m.v_dim
        attn = 2 * (2 * d + 2 * qk + 2 * v + 2 * m.q_lora_rank + 2 * m.kv_rank + m.qk_rope_dim)
    else:
        q, kv = m.n_heads * m.hd, m.kv_heads * m.hd
        attn = 2 * (2 * d + 2 * q + 2 * kv)

    def ffn(moe: bool) -> float:
        if moe:
            slots = m.moe.top_k * (2 * d + 2 * m.d_expert)
            return 2 * (2 * d + slots + 3 * m.d_shared_total) + 16 * m.moe.n_experts
        return 2 * (2 * d + 3 * m.d_ff)

    total = sum(attn + ffn(m.is_moe_layer(i)) for i in range(m.n_layers))
    head = 4 * d + 10 * V
    mtp = 2 * (4 * d + d) + attn + ffn(m.mtp_is_moe) + head  # per depth: norms in/out, projection, block, head
    return total + head + m.mtp_depth * mtp


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
    act_b = b * s * _act_bytes_per_token(rc)
    total_b = params_b + grads_b + optim_b + gathered_b + act_b

    # communication per GPU per step
    a2a_b = 4 * n_acc * L_moe * b * s * m.moe.top_k * m.d_model * (ep - 1) / ep * 2
    fsdp_b = n_acc * (2 + 2 + 4) * (P_n * (W - 1) / W + (P_e / ep) * (dp - 1) / dp)
    net, nvl = p.bw_gbps * 1e9 / 8, p.nvlink_gbps * 1e9 / 8  # bytes/s
    a2a_bw = nvl if ep <= p.gpus_per_node else net
    fsdp_bw = nvl if W <= p.gpus_per_node else net

    # compute and time
    fpt = m.flops_per_token(s)
    flops = fpt * B * s
    t_compute = flops / W / (p.mfu * p.peak_tflops * 1e12)
    t_a2a = a2a_b / a2a_bw
    t_fsdp = fsdp_b / fsdp_bw
    step = t_compute + t_a2a + max(0.0, t_fsdp - t_compute)
    return {
        "preset": rc.preset, "gpus": W, "ep": ep, "dp_shard": dp, "seq": s, "micro_batch": b, "batch": B,
        "grad_accum": n_acc, "tokens_per_step": B * s, "params_total": P, "params_experts": P_e,
        "params_active": pc["active"],
        "mem_params_gib": params_b / GIB, "mem_grads_gib": grads_b / GIB, "mem_optim_gib": optim_b / GIB,
        "mem_gathered_gib": gathered_b / GIB, "mem_activations_gib": act_b / GIB, "mem_total_gib": total_b / GIB,
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
        f"  activations (estimate)        {r['mem_activations_gib']:9.2f}",
        f"  total                         {r['mem_total_gib']:9.2f}",
        "",
        "per step",
        f"  FLOPs                         {h(r['flops_per_step'])}  ({h(r['flops_per_gpu_step'])} per GPU)",
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
