"""Load local Hugging Face checkpoints (config.json + *.safetensors, sharded or not) into moelab models.

Families: LLaMA, Mistral, Qwen2, Qwen3 (dense); Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-MoE v1 (MoE).
DeepSeek-V2/V3 need multi-head latent attention and are not supported yet. Nothing is downloaded: `path` is
a local directory. Errors name the file or tensor at fault; a tensor the mapping below leaves unused is an
error too (a weight silently dropped would change the function). The way back, moelab -> Hugging Face, is
`moelab.trainers.hf_export`.

Name mapping (HF -> moelab), per layer i:
  self_attn.{q,k,v,o}_proj -> attn.w{q,k,v,o};  self_attn.{q,k}_norm -> attn.{q,k}_norm
  (LLaMA / Qwen3 / OLMoE `attention_bias` also biases o_proj, which moelab lacks: it must be zero)
  input_layernorm -> attn_norm;  post_attention_layernorm -> ffn_norm
  mlp.{gate,up,down}_proj -> ffn.gate_up (gate rows first), ffn.down
  MoE: router <- mlp.gate (Mixtral: block_sparse_moe.gate); expert j <- experts.j.{gate,up,down}_proj
  (Mixtral: w1 gate, w3 up, w2 down), or the fused experts.{gate_up_proj, down_proj} layout;
  shared experts <- mlp.shared_expert(s); shared gate <- mlp.shared_expert_gate
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moelab.trainers.config import ModelConfig
from moelab.trainers.model import Transformer

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek")


class HFLoadError(ValueError):
    """A Hugging Face directory is missing a file or tensor, or a tensor has the wrong shape."""


class _Tensors:
    """Lazy access to the tensors of every safetensors file in a directory, remembering which file has which."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise HFLoadError(f"{root}: no *.safetensors files (and no model.safetensors.index.json)")
        self.where: dict[str, Path] = {}
        self._handles = {}
        for name in files:
            f = root / name
            if not f.exists():
                raise HFLoadError(f"{f}: listed in model.safetensors.index.json but missing")
            self._handles[f] = safe_open(str(f), framework="pt")
            for key in self._handles[f].keys():
                self.where[key] = f
        self.root = root
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.where:
            raise HFLoadError(f"{self.root}: tensor {key!r} not found in any safetensors file")
        t = self._handles[self.where[key]].get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise HFLoadError(f"{self.where[key]}: tensor {key!r} has shape {tuple(t.shape)}, "
                              f"expected {tuple(shape)} from config.json")
        self.used.add(key)
        return t

    def unused(self) -> list[str]:
        """Tensors that no moelab parameter took, less those that hold nothing: zero-element tensors (a
        Qwen2-MoE shared expert of width 0) and the RoPE tables some older exporters saved as weights."""
        left = []
        for key in sorted(set(self.where) - self.used):
            shape = self._handles[self.where[key]].get_slice(key).get_shape()
            if math.prod(shape) and not key.endswith("rotary_emb.inv_freq"):
                left.append(key)
        return left


def read_config(path: str | Path) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected a Hugging Face model directory)")
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: missing")
    return json.loads(cfg_file.read_text())


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Transformer]:
    """Any supported family, dense or MoE -> (ModelConfig, Transformer with the checkpoint's weights)."""
    hf = read_config(path)
    cfg = ModelConfig.from_hf_config(hf)
    tensors = _Tensors(Path(path))
    model = Transformer(cfg)  # its own init is overwritten by the checkpoint below
    state = _state_dict(cfg, hf, tensors, model)
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys
               if not k.endswith("expert_bias") and not (cfg.tie_embeddings and k == "lm_head.weight")]  # tied: embed
    if missing:  # a mapping gap is a bug here, not a user error, but say exactly what is missing
        raise HFLoadError(f"{path}: no source for moelab parameters {missing}")
    unused = tensors.unused()
    if unused:  # e.g. a feature config.json did not announce: loading without it would change the function
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise HFLoadError(f"{path}: tensors {unused[:3]}{more} have no place in the moelab model that "
                          f"config.json (model_type {hf.get('model_type')!r}) describes; not loaded")
    return cfg, model.to(dtype)


def load_hf_dense(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Transformer]:
    """A dense LLaMA / Mistral / Qwen2 / Qwen3 directory -> (ModelConfig, Transformer)."""
    mt = read_config(path).get("model_type")
    if mt not in DENSE_FAMILIES:
        raise HFLoadError(f"{Path(path) / 'config.json'}: model_type {mt!r} is not a dense family; allowed: "
                          f"{', '.join(DENSE_FAMILIES)} (use load_hf for {', '.join(MOE_FAMILIES)})")
    return load_hf(path, dtype)


def _state_dict(cfg: ModelConfig, hf: dict, t: _Tensors, model: Transformer) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def take(dst: str, src: str) -> None:
        out[dst] = t.get(src, shapes[dst])

    def glu(dst: str, gate: str, up: str) -> None:
        """moelab keeps gate and up stacked in one [2*width, d] matrix, gate rows first."""
        half = (shapes[dst][0] // 2, shapes[dst][1])
        out[dst] = torch.cat([t.get(gate, half), t.get(up, half)])

    take("embed.weight", "model.embed_tokens.weight")
    take("norm.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in t:
        t.used.add("lm_head.weight")  # tied: transformers ignores a stored copy of the head as well
    mt = hf["model_type"]
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        take(dst + "attn_norm.weight", src + "input_layernorm.weight")
        take(dst + "ffn_norm.weight", src + "post_attention_layernorm.weight")
        for p in "qkvo":
            take(dst + f"attn.w{p}.weight", src + f"self_attn.{p}_proj.weight")
            if cfg.qkv_bias and p != "o":
                take(dst + f"attn.w{p}.bias", src + f"self_attn.{p}_proj.bias")
        o_bias = src + "self_attn.o_proj.bias"
        if o_bias in t and t.get(o_bias, (cfg.d_model,)).count_nonzero():
            # `attention_bias` (LLaMA, Qwen3, OLMoE) biases o_proj too; moelab's output projection has none,
            # which is exact only while that bias is zero (as moelab's own exports write it)
            raise HFLoadError(f"{t.where[o_bias]}: tensor {o_bias!r} is non-zero; moelab's attention output "
                              f"projection has no bias, so this checkpoint cannot be loaded exactly")
        if cfg.qk_norm != "none":
            take(dst + "attn.q_norm.weight", src + "self_attn.q_norm.weight")
            take(dst + "attn.k_norm.weight", src + "self_attn.k_norm.weight")
        if not cfg.is_moe_layer(i):
            glu(dst + "ffn.gate_up.weight", src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
            take(dst + "ffn.down.weight", src + "mlp.down_proj.weight")
            continue
        mlp = src + ("block_sparse_moe." if mt == "mixtral" else "mlp.")
        take(dst + "ffn.router.weight", mlp + "gate.weight")
        out[dst + "ffn.w_gate_up"], out[dst + "ffn.w_down"] = _experts(cfg, mt, mlp, t, shapes, dst)
        if cfg.moe.n_shared:
            shared = mlp + ("shared_expert." if mt == "qwen2_moe" else "shared_experts.")
            glu(dst + "ffn.shared.gate_up.weight", shared + "gate_proj.weight", shared + "up_proj.weight")
            take(dst + "ffn.shared.down.weight", shared + "down_proj.weight")
        if cfg.moe.shared_gate:
            take(dst + "ffn.shared_gate.weight", mlp + "shared_expert_gate.weight")
        elif mlp + "shared_expert_gate.weight" in t:
            t.used.add(mlp + "shared_expert_gate.weight")  # gates a shared expert of width 0: no effect
    return out


def _experts(cfg: ModelConfig, mt: str, mlp: str, t: _Tensors, shapes: dict, dst: str):
    E, d, de = cfg.moe.n_experts, cfg.d_model, cfg.d_expert
    fused = mlp + "experts.gate_up_proj"
    if fused in t:  # the stacked layout some exporters write: [E, 2*de, d] and [E, d, de]
        return t.get(fused, shapes[dst + "ffn.w_gate_up"]), t.get(mlp + "experts.down_proj", shapes[dst + "ffn.w_down"])
    names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate_up, down = [], []
    for j in range(E):
        e = f"{mlp}experts.{j}."
        gate_up.append(torch.cat([t.get(e + f"{names[0]}.weight", (de, d)), t.get(e + f"{names[1]}.weight", (de, d))]))
        down.append(t.get(e + f"{names[2]}.weight", (d, de)))
    return torch.stack(gate_up), torch.stack(down)
