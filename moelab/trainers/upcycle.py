"""Dense -> MoE initialisation: every knob the upcycling ablations vary.

A SwiGLU FFN is a sum over its d_ff intermediate *units* (unit i: row i of gate and of up, column i of
down): any set of units is itself a SwiGLU, and multiplying a unit's up row and down column by sqrt(c)
multiplies its contribution by c. Per MoE layer (dense width d_ff, expert width d_e, G = d_ff / d_e; a
*group* is the experts gG .. gG+G-1, which a `virtual_group` router ties to one logit):
  1. split (He et al. 2024): expert gG+s holds units [s d_e, (s+1) d_e) — rows of gate and up (split
     separately), columns of down. With `shuffle` (Qwen2 report, Drop-Upcycling's reference code) it holds
     slice s of a fresh random permutation of the d_ff units drawn for its group: every group still holds
     each unit once, but different groups hold different partitions. With G = 1 there is nothing to
     partition (permuting a whole FFN's units changes nothing), so the config refuses `shuffle` there;
  2. `reset_ratio` r: Drop-Upcycling (Nakamura et al. 2025) — round(r * d_e) units chosen at random per
     expert are re-drawn from N(mean, std) of the selected slice of the same matrix;
  3. scale: unit u of a routed expert by F * c_u, as sqrt(F c_u) on up and on down (SwiGLU is linear in
     both, so the factor is exact; the paper spreads F^(1/3) over gate, up and down, which treats the SiLU
     gate as if it were homogeneous). F is `scaling`; c_u is the routed share of the unit (below);
  4. `noise_std` sigma: N(0, sigma^2) added to gate, up and down.
Attention, embeddings and norms are copied; the router is fresh: `random` N(0, router_std), or
`virtual_group` (n_experts/G rows each repeated G times).

Shared experts with `shared_init: dense`: shared expert i holds the units of shard i mod (d_ff / d_shared)
(the whole FFN when d_shared = d_ff). A unit the shared experts hold n_u times is split evenly between those
n_u shared copies and the routed experts: each carries c_u = 1 / (n_u + 1) of it; units no shared expert
holds keep c_u = 1. So the shared and the routed parts add up to the dense FFN whenever the routed part
alone would reproduce it, instead of carrying it twice. Splitting rather than giving a unit wholly to the
shared side keeps every copy trainable (a unit with zero up and down weights gets zero gradients). The
`shared_gate` multiplies the shared part by sigmoid(x . w) afterwards: not compensated.

The `nvidia` scaling factor. Suppose the T = top_k selected slots form T/G whole groups (what a
`virtual_group` router picks), each adding up to the dense FFN, and every slot carries the gate weight w of
a uniform router: 1/n_experts for softmax without renormalisation, 1/2 for sigmoid without, 1/T with
renormalised gates. The MoE output is then (T/G) * w * FFN(x), and F = G / (T * w) restores the dense
output; for softmax without renormalisation this is E*G^2/T with E = n_experts/G, the factor of He et al.
(2024). Only renormalised gates keep the weights of a token's slots summing to one for any router draw;
otherwise they vary from token to token, which no constant F undoes.

Where the upcycled model computes the dense function exactly (no reset, no noise; the full matrix is
tests/trainers/test_preservation.py and the README's table): with renormalised gates, a `virtual_group`
router (top_k a multiple of G: whole groups are picked, and their gate weights sum to one whatever the
router draws) and F = G (`nvidia`); with G = 1 this needs no router assumption, and F = 1 (`none` and
`nvidia` agree). Without renormalisation only a uniform router (router_std = 0, at G = 1) is exact, and only
with F equal to the `nvidia` factor. A `random` router with G > 1 picks shards independently of one another:
the output is then not the dense one, whatever the scaling. Shared experts (`shared_init: dense`, no
`shared_gate`) and `shuffle` change none of these verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, RunConfig, UpcycleConfig, from_dict
from moelab.trainers.init import fill_, generator, local_box, local_tensor
from moelab.trainers.model import Transformer, meta_model
from moelab.trainers.moe import MoE

# Offset of the shuffle's random stream from upcycle.seed: with one seed, the shuffle-on and shuffle-off arms
# draw the same router, reset positions and noise, and differ only in the partition of the units.
_SHUFFLE_STREAM = 0x5A17
# The router has its own stream too: arms of an ablation that differ only in noise or reset (same upcycle.seed)
# start from the same router, so their paired-by-seed difference is the knob's effect, not a router redraw.
_ROUTER_STREAM = 0x7E57


def scaling_factor(moe: MoEConfig, d_ff: int, d_expert: int, scaling: str | float) -> float:
    """The multiplier F on each expert's output (see the module docstring)."""
    if scaling == "none":
        return 1.0
    if scaling != "nvidia":
        return float(scaling)
    G, T, N = d_ff // d_expert, moe.top_k, moe.n_experts
    if moe.renormalize:
        w = 1.0 / T
    elif moe.score_func == "softmax":
        w = 1.0 / N
    else:
        w = 0.5  # sigmoid(0)
    return G / (T * w)


def upcycle(dense: Transformer, moe: MoEConfig, cfg: UpcycleConfig | None = None) -> Transformer:
    """A new MoE Transformer initialised from `dense` (left untouched), on dense's device.

    dense: a dense moelab Transformer; moe: the MoE layers' shape and routing (n_experts, top_k,
    granularity or d_expert, shared experts, score_func, renormalize, ...); cfg: the initialisation knobs.
    """
    cfg = (cfg or UpcycleConfig()).validate()
    target = _check_upcycle(dense.cfg, dataclasses.replace(dense.cfg, moe=moe), cfg)
    model = meta_model(target)
    model.to_empty(device=next(dense.parameters()).device)
    upcycle_into(model, dense, cfg)
    return model


def _check_upcycle(src: ModelConfig, target: ModelConfig, cfg: UpcycleConfig) -> ModelConfig:
    """ConfigError unless a dense `src` upcycles into `target` with `cfg`; returns target, validated."""
    if src.moe.enabled:
        raise ConfigError("upcycle: the source model is already an MoE; allowed: a dense model "
                          "(continue an MoE with upcycle.source and the same model config instead)")
    if not target.moe.enabled:
        raise ConfigError("model.moe.n_experts: got 0; allowed: >= 1 to upcycle into an MoE")
    target = target.validate()
    cfg.check_model(target)
    moe, d_ff, de = target.moe, src.d_ff, target.d_expert
    if d_ff % de:
        raise ConfigError(f"model.moe.d_expert: got {de}; allowed: a divisor of the dense d_ff={d_ff}")
    G = d_ff // de
    if cfg.router_init == "virtual_group" and (moe.n_experts % G or moe.top_k % G):
        raise ConfigError(f"upcycle.router_init: 'virtual_group' needs model.moe.n_experts={moe.n_experts} and "
                          f"model.moe.top_k={moe.top_k} to be multiples of the granularity G={G}")
    return target


@torch.no_grad()
def upcycle_into(model: Transformer, dense: Transformer, cfg: UpcycleConfig) -> None:
    """Fill `model`, an MoE of dense's shape already materialised (`to_empty`), as `upcycle` does. `model`
    may be sharded (FSDP2, EP): each rank then computes only the experts it holds, and the rows of the
    small tensors (router, shared experts, attention copies) it holds, with the values one process gets.

    Why that holds: the per-layer streams (shuffle, router) are drawn whole, in layer order, on every rank
    (they are small); reset and noise are drawn per expert from a stream keyed by (upcycle.seed, layer, expert).
    """
    cfg = cfg.validate()
    src, target = dense.cfg, model.cfg
    _check_upcycle(src, target, cfg)
    moe = target.moe
    d_ff, de = src.d_ff, target.d_expert
    G = d_ff // de
    shared_units = _shared_units(target) if moe.n_shared and cfg.shared_init == "dense" else None
    routed_share = torch.ones(d_ff, dtype=torch.float64)  # c_u of the module docstring
    if shared_units is not None:
        routed_share = 1.0 / (torch.bincount(shared_units, minlength=d_ff).double() + 1.0)
    F = scaling_factor(moe, d_ff, de, cfg.scaling)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + _SHUFFLE_STREAM)
    router_gen = torch.Generator().manual_seed(cfg.seed + _ROUTER_STREAM)
    model.init_weights(cfg.seed)  # fresh values for whatever is not copied (router, random shared experts)
    dense_state = dense.state_dict()
    for name, p in model.named_parameters():
        if ".ffn." not in name and name in dense_state:
            fill_(p, lambda box, t=dense_state[name]: t[box])
    # The MTP modules' blocks (DeepSeek-V3 §2.2) upcycle like the model's: their FFN is an MoE whenever the
    # last layer's is (ModelConfig.mtp_is_moe).
    blocks = [*((f"layers.{i}", a, b) for i, (a, b) in enumerate(zip(dense.layers, model.layers))),
              *((f"mtp.{j}.block", a.block, b.block) for j, (a, b) in enumerate(zip(dense.mtp, model.mtp)))]
    for where, dense_block, block in blocks:
        gate_up = dense_block.ffn.gate_up.weight.detach().float()
        gate, up = gate_up[:d_ff], gate_up[d_ff:]
        down = dense_block.ffn.down.weight.detach().float()
        if not isinstance(block.ffn, MoE):
            dense_ffn = dense_block.ffn.state_dict()
            for name, p in block.ffn.named_parameters():
                fill_(p, lambda box, t=dense_ffn[name]: t[box])
            continue
        units = expert_units(block.ffn.n_experts, G, d_ff, cfg.shuffle, shuffle_gen)
        _init_experts(block.ffn, gate, up, down, units, F * routed_share, cfg, f"{where}.ffn")
        _init_router(block.ffn, G, cfg, router_gen)
        if shared_units is not None:
            _init_shared(block.ffn, gate, up, down, shared_units, routed_share)


def expert_units(n_experts: int, G: int, d_ff: int, shuffle: bool, gen: torch.Generator) -> torch.Tensor:
    """Which dense units each routed expert holds: [n_experts, d_ff / G] indices into 0..d_ff-1.

    Expert gG+s gets slice s of its group's order of the units: 0..d_ff-1, or with `shuffle` a permutation
    drawn afresh for each group. Each expert's units are sorted: their order inside an expert is no part of
    the function, only which units it holds is.
    """
    de = d_ff // G
    units = torch.empty(n_experts, de, dtype=torch.long)
    for j in range(n_experts):
        s = j % G
        if s == 0:
            order = torch.randperm(d_ff, generator=gen) if shuffle else torch.arange(d_ff)
        units[j] = order[s * de:(s + 1) * de].sort().values
    return units


def _init_experts(layer: MoE, gate, up, down, units: torch.Tensor, scale: torch.Tensor, cfg: UpcycleConfig,
                  where: str) -> None:
    """units: [E, d_e] dense unit per expert unit; scale: [d_ff] the factor F * c_u on each unit's output.
    Only the experts (and their rows) this rank holds are computed; expert j's reset and noise come from
    stream (upcycle.seed, where, j), whoever computes it."""
    n_reset = round(cfg.reset_ratio * layer.d_expert)
    box_gu, box_dn = local_box(layer.w_gate_up), local_box(layer.w_down)
    whole = box_gu is None or box_dn is None  # a strided layout (see init.local_box): this layer's experts whole
    if whole:
        E, full = layer.n_experts, tuple(slice(None) for _ in range(2))
        box_gu = box_dn = (slice(0, E), *full)
        local_gu = torch.empty(E, 2 * layer.d_expert, gate.shape[1])
        local_dn = torch.empty(E, down.shape[0], layer.d_expert)
    else:
        local_gu, local_dn = local_tensor(layer.w_gate_up), local_tensor(layer.w_down)
    if box_dn[0] != box_gu[0]:
        raise ValueError(f"upcycle: {where}.w_gate_up and w_down hold different experts on this rank")
    first = box_gu[0].start
    for j in range(box_gu[0].start, box_gu[0].stop):
        gen = generator(cfg.seed, f"upcycle.{where}", j)
        idx = units[j]
        g, u, dn = gate[idx], up[idx], down[:, idx]  # [de, d], [de, d], [d, de]; indexing copies
        if n_reset:
            pick = torch.randperm(layer.d_expert, generator=gen)[:n_reset]
            g[pick] = _redraw(g[pick], gen)
            u[pick] = _redraw(u[pick], gen)
            dn[:, pick] = _redraw(dn[:, pick], gen)
        root = scale[idx].sqrt()
        if not torch.all(root == 1.0):
            u, dn = u * root[:, None], dn * root
        if cfg.noise_std:
            g, u, dn = (w + cfg.noise_std * torch.randn(w.shape, generator=gen) for w in (g, u, dn))
        local_gu[j - first].copy_(torch.cat([g, u])[box_gu[1:]])
        local_dn[j - first].copy_(dn[box_dn[1:]])
    if whole:
        fill_(layer.w_gate_up, lambda box: local_gu[box])
        fill_(layer.w_down, lambda box: local_dn[box])


def _redraw(block: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh N(mean, std) values with the statistics of `block` itself (Drop-Upcycling)."""
    return block.mean() + block.std() * torch.randn(block.shape, generator=gen)


def _init_router(layer: MoE, G: int, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    """The whole router [E, d] is drawn on every rank (it is small, and the stream runs over layers); each
    rank keeps its rows."""
    E, d = layer.router.weight.shape
    if cfg.router_init == "virtual_group":
        rows = cfg.router_std * torch.randn(E // G, d, generator=gen)
        w = rows.repeat_interleave(G, dim=0)  # experts gG .. gG+G-1 hold the G slices of one unit order
    else:
        w = cfg.router_std * torch.randn(E, d, generator=gen)
    fill_(layer.router.weight, lambda box: w[box])
    layer.router.expert_bias.zero_()


def _shared_units(target: ModelConfig) -> torch.Tensor:
    """The dense units the shared experts hold, concatenated: shard i mod (d_ff / d_shared) for expert i."""
    d_ff, width, n = target.d_ff, target.moe.d_shared or target.d_expert, target.moe.n_shared
    if d_ff % width:
        raise ConfigError(f"model.moe.d_shared: got {width}; allowed: d_ff={d_ff} or a divisor of it when "
                          f"upcycle.shared_init='dense' (or set upcycle.shared_init='random')")
    per = d_ff // width
    return torch.cat([torch.arange((i % per) * width, (i % per + 1) * width) for i in range(n)])


def _init_shared(layer: MoE, gate, up, down, units: torch.Tensor, routed_share: torch.Tensor) -> None:
    # A unit held n_u times by the shared experts and once by the routed side: every copy carries 1/(n_u+1),
    # which is the routed share c_u too.
    root = routed_share[units].sqrt()
    gate_up = torch.cat([gate[units], up[units] * root[:, None]])
    fill_(layer.shared.gate_up.weight, lambda box: gate_up[box])
    fill_(layer.shared.down.weight, lambda box: (down[:, units] * root)[box])


# ----------------------------------------------------------------------------------------------------------
# Sources


def _empty(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """A model with storage but no draws, buffers set: for weights that are loaded right after."""
    model = meta_model(cfg)
    model.to_empty(device=device)
    model.init_buffers()
    return model


def _dcp_config(p: Path) -> ModelConfig:
    return from_dict(ModelConfig, json.loads((p / "meta.json").read_text())["config"]["model"])


def _is_dcp(p: Path) -> bool:
    return p.is_dir() and (p / ".metadata").exists() and (p / "meta.json").exists()


def _is_hf(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists() and not (p / "checkpoint.pt").exists()


def _checkpoint_file(p: Path) -> Path:
    ckpt = p / "checkpoint.pt" if p.is_dir() else p
    if not ckpt.exists():
        raise FileNotFoundError(f"upcycle.source: {p} holds neither checkpoint.pt nor a Hugging Face config.json")
    return ckpt


def load_source(path: str | Path) -> Transformer:
    """A model from a moelab run directory / checkpoint.pt, a sharded checkpoint directory (ckpt-<step>/,
    several ranks or Ray Train workers), or a local Hugging Face directory. Whole, on the CPU."""
    p = Path(path)
    if _is_hf(p):
        from moelab.trainers.hf import load_hf

        return load_hf(p)[1]
    if _is_dcp(p):  # a sharded DCP checkpoint
        import torch.distributed.checkpoint as dcp

        model = _empty(_dcp_config(p))
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(p), no_dist=True)
        model.load_state_dict(state["model"])
        return model
    state = torch.load(_checkpoint_file(p), map_location="cpu", weights_only=True)
    model = _empty(from_dict(ModelConfig, state["config"]["model"]))
    model.load_state_dict(state["model"])
    return model


def _check_source(src: ModelConfig, rc: RunConfig) -> None:
    """ConfigError unless rc.model can start from a model of config `src`: the same architecture, or a dense
    model of the same shape for an MoE."""
    if src == rc.model:
        return
    if src.moe.enabled or not rc.model.moe.enabled:
        raise ConfigError(f"upcycle.source: {rc.upcycle.source} has a different architecture from model.*; "
                          f"allowed: the same architecture, or a dense source for an MoE model")
    shape_keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "moe"]
    diff = [k for k in shape_keys if getattr(src, k) != getattr(rc.model, k)]
    if diff:
        raise ConfigError(f"upcycle.source: the dense model differs from model.* in {diff}: "
                          + json.dumps({k: [getattr(src, k), getattr(rc.model, k)] for k in diff}))


def initial_model(rc: RunConfig) -> Transformer | None:
    """The starting weights `rc.upcycle.source` asks for: the source itself when it already has rc.model's
    architecture (continued training), an upcycled MoE when the source is dense and rc.model is an MoE.
    One process, on the CPU; a sharded model is filled in place by `init_from_source`."""
    if not rc.upcycle.source:
        return None
    model = meta_model(rc.model)
    model.to_empty(device="cpu")
    init_from_source(model, rc)
    return model


@torch.no_grad()
def init_from_source(model: Transformer, rc: RunConfig) -> None:
    """Fill `model` (rc.model, materialised with `to_empty`, plain or sharded by FSDP2 / EP) with the weights
    `initial_model(rc)` has, each rank computing or reading only the parts it holds.

    A source of rc.model's own architecture is read shard by shard: a DCP directory through DCP (each rank
    reads its shards), a checkpoint.pt memory-mapped (each rank touches the pages of its slices). A dense
    source is read whole (it is small next to the MoE it becomes) and upcycled with `upcycle_into`. A Hugging
    Face directory is imported whole by `hf.load_hf` in either case.
    """
    p = Path(rc.upcycle.source)
    model.init_buffers()
    if _is_dcp(p) and _dcp_config(p) == rc.model:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from moelab.trainers.loop import _dcp_classes

        SafeReader, SafePlanner = _dcp_classes()
        state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            dcp.load(state, storage_reader=SafeReader(p), planner=SafePlanner(), no_dist=not dist.is_initialized())
        set_model_state_dict(model, state["model"])
        return
    if not _is_dcp(p) and not _is_hf(p):
        state = torch.load(_checkpoint_file(p), map_location="cpu", weights_only=True, mmap=True)
        cfg = from_dict(ModelConfig, state["config"]["model"])
        if cfg == rc.model:
            from moelab.trainers.loop import check_state_dict

            want = {k: v.shape for k, v in model.state_dict().items()}
            check_state_dict(state["model"], want, f"upcycle.source {p}")
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in state["model"]:  # persistent buffers too (router biases); not the rotary tables
                    fill_(t, lambda box, src=state["model"][name]: src[box])
            return
        _check_source(cfg, rc)
        del state
    src = load_source(p)
    _check_source(src.cfg, rc)
    if src.cfg == rc.model:
        state = src.state_dict()
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name in state:
                fill_(t, lambda box, v=state[name]: v[box])
        return
    upcycle_into(model, src, rc.upcycle)
