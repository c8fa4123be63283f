"""Dense -> MoE initialisation: every knob the upcycling ablations vary.

Order of operations per routed expert j of an MoE layer (dense FFN width d_ff, expert width d_e, G = d_ff/d_e):
  1. copy shard `j mod G` of the dense FFN: rows of gate and up (split separately), columns of down
     (granular split, He et al. 2024);
  2. `shuffle`: permute the expert's d_e intermediate units (gate/up rows and down columns jointly), which
     alone changes nothing about the function (Qwen2 report);
  3. `reset_ratio` r: Drop-Upcycling (Nakamura et al. 2025) — round(r * d_e) units chosen at random per
     expert are re-drawn from N(mean, std) of the selected slice of the same matrix;
  4. `scaling` F: the expert's output is multiplied by F, as sqrt(F) on up and sqrt(F) on down (SwiGLU is
     linear in both, so the factor is exact; the paper spreads F^(1/3) over gate, up and down, which treats
     the SiLU gate as if it were homogeneous);
  5. `noise_std` sigma: N(0, sigma^2) added to gate, up and down.
Attention, embeddings and norms are copied; the router is fresh: `random` N(0, router_std), or
`virtual_group` (n_experts/G rows each repeated G times, so the G shards of one dense FFN share a logit).

The `nvidia` scaling factor. With router scores that are uniform across experts and top_k = T a multiple of
G, the selected slots form T/G whole groups, each of which adds up to the dense FFN, and each slot carries
the gate weight w: softmax without renormalisation w = 1/n_experts, renormalised w = 1/T, sigmoid w = 1/2.
So the MoE output is (T/G) * w * FFN(x), and F = G / (T * w) restores the dense output. For softmax
without renormalisation this is E*G^2/T with E = n_experts/G, the factor of He et al. (2024). With
renormalised gates the groups' weights sum to one for *any* router, so F = G makes the upcycled model
compute exactly the dense function whatever the router draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from moelab.trainers.config import ConfigError, ModelConfig, MoEConfig, RunConfig, UpcycleConfig, from_dict
from moelab.trainers.model import Transformer
from moelab.trainers.moe import MoE


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
    """A new MoE Transformer initialised from `dense` (left untouched).

    dense: a dense moelab Transformer; moe: the MoE layers' shape and routing (n_experts, top_k,
    granularity or d_expert, shared experts, score_func, renormalize, ...); cfg: the initialisation knobs.
    """
    cfg = (cfg or UpcycleConfig()).validate()
    src = dense.cfg
    if src.moe.enabled:
        raise ConfigError("upcycle: the source model is already an MoE; allowed: a dense model "
                          "(continue an MoE with upcycle.source and the same model config instead)")
    if not moe.enabled:
        raise ConfigError("model.moe.n_experts: got 0; allowed: >= 1 to upcycle into an MoE")
    target = dataclasses.replace(src, moe=moe).validate()
    d_ff, de = src.d_ff, target.d_expert
    if d_ff % de:
        raise ConfigError(f"model.moe.d_expert: got {de}; allowed: a divisor of the dense d_ff={d_ff}")
    G = d_ff // de
    if cfg.router_init == "virtual_group" and (moe.n_experts % G or moe.top_k % G):
        raise ConfigError(f"upcycle.router_init: 'virtual_group' needs model.moe.n_experts={moe.n_experts} and "
                          f"model.moe.top_k={moe.top_k} to be multiples of the granularity G={G}")
    F = scaling_factor(moe, d_ff, de, cfg.scaling)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Transformer(target)
    model.init_weights(cfg.seed)  # fresh values for whatever is not copied (router, random shared experts)
    dense_state = dense.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if ".ffn." not in name and name in dense_state:
                p.copy_(dense_state[name])
        for i, block in enumerate(model.layers):
            gate_up = dense.layers[i].ffn.gate_up.weight.detach().float()
            gate, up = gate_up[:d_ff], gate_up[d_ff:]
            down = dense.layers[i].ffn.down.weight.detach().float()
            if not isinstance(block.ffn, MoE):
                block.ffn.load_state_dict(dense.layers[i].ffn.state_dict())
                continue
            _init_experts(block.ffn, gate, up, down, G, F, cfg, gen)
            _init_router(block.ffn, G, cfg, gen)
            if block.ffn.shared is not None and cfg.shared_init == "dense":
                _init_shared(block.ffn, gate, up, down, target)
    return model.to(next(dense.parameters()).device)


def _init_experts(layer: MoE, gate, up, down, G: int, F: float, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    E, de = layer.n_experts, layer.d_expert
    n_reset = round(cfg.reset_ratio * de)
    for j in range(E):
        s = slice((j % G) * de, (j % G + 1) * de)
        g, u, dn = gate[s].clone(), up[s].clone(), down[:, s].clone()  # [de, d], [de, d], [d, de]
        if cfg.shuffle:
            perm = torch.randperm(de, generator=gen)
            g, u, dn = g[perm], u[perm], dn[:, perm]
        if n_reset:
            idx = torch.randperm(de, generator=gen)[:n_reset]
            g[idx] = _redraw(g[idx], gen)
            u[idx] = _redraw(u[idx], gen)
            dn[:, idx] = _redraw(dn[:, idx], gen)
        if F != 1.0:
            u, dn = u * math.sqrt(F), dn * math.sqrt(F)
        if cfg.noise_std:
            g, u, dn = (w + cfg.noise_std * torch.randn(w.shape, generator=gen) for w in (g, u, dn))
        layer.w_gate_up[j].copy_(torch.cat([g, u]))
        layer.w_down[j].copy_(dn)


def _redraw(block: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh N(mean, std) values with the statistics of `block` itself (Drop-Upcycling)."""
    return block.mean() + block.std() * torch.randn(block.shape, generator=gen)


def _init_router(layer: MoE, G: int, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    E, d = layer.router.weight.shape
    if cfg.router_init == "virtual_group":
        rows = cfg.router_std * torch.randn(E // G, d, generator=gen)
        w = rows.repeat_interleave(G, dim=0)  # experts gG .. gG+G-1 hold shards 0..G-1 of one dense FFN
    else:
        w = cfg.router_std * torch.randn(E, d, generator=gen)
    layer.router.weight.copy_(w)
    layer.router.expert_bias.zero_()


def _init_shared(layer: MoE, gate, up, down, target: ModelConfig) -> None:
    """Shared experts from the dense FFN: the whole FFN, or shard i mod (d_ff / d_shared) for expert i."""
    d_ff, width = gate.shape[0], target.moe.d_shared or target.d_expert
    n = target.moe.n_shared
    if width != d_ff and d_ff % width:
        raise ConfigError(f"model.moe.d_shared: got {width}; allowed: d_ff={d_ff} or a divisor of it when "
                          f"upcycle.shared_init='dense' (or set upcycle.shared_init='random')")
    shards = [slice((i % (d_ff // width)) * width, (i % (d_ff // width) + 1) * width) for i in range(n)]
    g = torch.cat([gate[s] for s in shards])
    u = torch.cat([up[s] for s in shards])
    dn = torch.cat([down[:, s] for s in shards], dim=1)
    layer.shared.gate_up.weight.copy_(torch.cat([g, u]))
    layer.shared.down.weight.copy_(dn)


# ----------------------------------------------------------------------------------------------------------
# Sources


def load_source(path: str | Path) -> Transformer:
    """A model from a moelab run directory / checkpoint.pt, a sharded checkpoint directory (ckpt-<step>/,
    several ranks or Ray Train workers), or a local Hugging Face directory."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists() and not (p / "checkpoint.pt").exists():
        from moelab.trainers.hf import load_hf

        return load_hf(p)[1]
    if p.is_dir() and (p / ".metadata").exists() and (p / "meta.json").exists():  # a sharded DCP checkpoint
        import torch.distributed.checkpoint as dcp

        model = Transformer(from_dict(ModelConfig, json.loads((p / "meta.json").read_text())["config"]["model"]))
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(p), no_dist=True)
        model.load_state_dict(state["model"])
        return model
    ckpt = p / "checkpoint.pt" if p.is_dir() else p
    if not ckpt.exists():
        raise FileNotFoundError(f"upcycle.source: {p} holds neither checkpoint.pt nor a Hugging Face config.json")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = from_dict(ModelConfig, state["config"]["model"])
    model = Transformer(cfg)
    model.load_state_dict(state["model"])
    return model


def initial_model(rc: RunConfig) -> Transformer | None:
    """The starting weights `rc.upcycle.source` asks for: the source itself when it already has rc.model's
    architecture (continued training), an upcycled MoE when the source is dense and rc.model is an MoE."""
    if not rc.upcycle.source:
        return None
    src = load_source(rc.upcycle.source)
    if src.cfg == rc.model:
        return src
    if src.cfg.moe.enabled or not rc.model.moe.enabled:
        raise ConfigError(f"upcycle.source: {rc.upcycle.source} has a different architecture from model.*; "
                          f"allowed: the same architecture, or a dense source for an MoE model")
    shape_keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "moe"]
    diff = [k for k in shape_keys if getattr(src.cfg, k) != getattr(rc.model, k)]
    if diff:
        raise ConfigError(f"upcycle.source: the dense model differs from model.* in {diff}: "
                          + json.dumps({k: [getattr(src.cfg, k), getattr(rc.model, k)] for k in diff}))
    return upcycle(src, rc.model.moe, rc.upcycle)
