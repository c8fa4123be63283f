"""Activation checkpointing (AC), applied to a plain `Transformer` from outside: `apply_ac(model, mode)`.

Modes (`train.activation_checkpointing`):
- "none": autograd keeps every tensor the backward needs (see `plan.activation_bytes` for what that is).
- "full": every block (`model.layers[i]`) and every MTP module (`model.mtp[j]`: its norms, projection and block)
  keeps only its inputs; its forward runs again in the backward. Memory per block: the block's input (2d bytes
  per token in bf16) and the routing kept in `MoE.stats`. Cost: one more forward of every block (about +1/3 of
  the blocks' FLOPs) and, under expert parallelism, one more dispatch and combine all-to-all per MoE layer.
- "selective": recompute what is cheap to recompute and costly to keep, never the FFN/MoE. Per block the
  attention norm, the attention sub-layer (projections, QK-norm, RoPE, SDPA) and the FFN norm are recomputed;
  in MTP modules their input and output norms too, and the model's final norm. Every RMSNorm then keeps its
  bf16 input (2 bytes per feature) instead of its fp32 copy, fp32 reciprocal and bf16 normalised output (6),
  and the attention sub-layer keeps its input instead of q, k, v, output, logsumexp and the QK-norm / MLA
  latent-norm tensors. The FFN/MoE keeps its saved tensors: recomputing it would repeat the expert GEMMs and,
  under expert parallelism, the token all-to-alls. Cost: one more forward of each attention sub-layer
  (its projections and the attention itself). `moelab plan --activation-checkpointing` prints both.
moe-1b on 8 GPUs with ep 8 (bf16, per token and MoE block): none 193.5 KB, selective 136.0 KB (+12 % FLOPs
per step), full 4.2 KB (+31 % FLOPs, all-to-all bytes x 1.5).

Mechanics. The chosen modules' class is swapped for a subclass whose forward runs the original one under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`, the way FSDP2's `fully_shard` swaps classes: parameter
names, state dicts and `isinstance` stay as they were, so checkpoints, the optimiser's parameter groups and
`Transformer.moe_layers()` see the same model. Apply it before FSDP wrapping (`fully_shard` then wraps the
checkpointed block, so its all-gather runs before the checkpointed forward and its pre-backward hook before
the recomputation), and before `train.compile` compiles the blocks (the compiled graph then holds the
checkpoint and recomputes by itself).

Recomputation runs module forwards again; `recomputing()` tells code with side effects that it is inside one:
`MoE.forward` then leaves its balance losses, statistics and the aux-loss-free load counter alone, so nothing
is counted twice. The recomputed forward must produce tensors of the same shapes (torch checks): the routing
must not change between the forward and its recomputation, which holds for a deterministic forward (no
dropout; the router bias moves only after the optimiser step).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")

# Per thread: the recomputation runs in the thread that runs the backward (on CUDA an autograd device thread),
# and a forward running meanwhile in another thread is a first forward.
_state = threading.local()


def recomputing() -> bool:
    """True inside the backward's recomputation of a checkpointed module's forward. False while torch.compile
    traces (a compiled graph recomputes without rerunning Python; and no graph break on the thread-local)."""
    if torch.compiler.is_compiling():
        return False
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recompute_scope():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _contexts():
    """checkpoint's context_fn: nothing around the first forward, the recompute flag around the recomputation."""
    return contextlib.nullcontext(), _recompute_scope()


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """`cls` with its forward under non-reentrant checkpointing (one subclass per class, reused)."""
    if cls not in _CLASSES:
        def forward(self, *args, **kwargs):
            # preserve_rng_state=False: the model draws no random numbers in its forward (no dropout), so the
            # RNG state need not be stashed and restored per block. Under torch.compile (`train.compile`) the
            # compiled graph recomputes by itself, without rerunning Python (and takes no context_fn).
            fwd = super(sub, self).forward
            if torch.compiler.is_compiling():
                return checkpoint(fwd, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
            return checkpoint(fwd, *args, use_reentrant=False, preserve_rng_state=False, context_fn=_contexts,
                              **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_moelab_ac": True})
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Recompute `module`'s forward in the backward instead of keeping its saved tensors. In place."""
    if not getattr(module, "_moelab_ac", False):
        module.__class__ = _checkpointed_class(type(module))
    return module


def ac_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules `apply_ac(model, mode)` checkpoints, in forward order (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: got {mode!r}; allowed: {', '.join(MODES)}")
    mtp = list(getattr(model, "mtp", ()))
    if mode == "none":
        return []
    if mode == "full":
        return [*model.layers, *mtp]
    out = []
    for block in model.layers:
        out += [block.attn_norm, block.attn, block.ffn_norm]
    out.append(model.norm)
    for m in mtp:
        out += [m.embed_norm, m.hidden_norm, m.block.attn_norm, m.block.attn, m.block.ffn_norm, m.out_norm]
    return out


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Activation checkpointing `mode` ("none", "selective", "full") on a plain Transformer, before any
    FSDP wrapping. In place; returns the model. "none" leaves the model as it is; a model checkpointed already
    is refused (nested regions would recompute twice)."""
    mods = ac_modules(model, mode)
    if not mods:  # "none": the model as it is
        return model
    if any(getattr(m, "_moelab_ac", False) for m in model.modules()):
        raise ValueError("apply_ac: the model has activation checkpointing applied already")
    for m in mods:
        checkpoint_module(m)
    # For `train.compile`: a checkpointed MoE's forward sets its losses, statistics and load counter, which
    # torch.compile would refuse inside a checkpoint (a graph break: the block would run uncompiled) since
    # eager recomputation replays them. Not replaying them is what the eager path does too (`recomputing`).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return model
