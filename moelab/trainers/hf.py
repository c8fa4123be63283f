"""Load local Hugging Face checkpoints (config.json + *.safetensors, sharded or not) into moelab models.

Families: LLaMA, Mistral, Qwen2, Qwen3 (dense); Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-MoE v1 (MoE);
DeepSeek-V2 and DeepSeek-V3 (multi-head latent attention; MoE after `first_k_dense_replace` dense layers).
Nothing is downloaded: `path` is a local directory. Errors name the file or tensor at fault; a tensor the
mapping below leaves unused is an error too (a weight silently dropped would change the function). The way
back, moelab -> Hugging Face, is `moelab.trainers.hf_export`.

Name mapping (HF -> moelab), per layer i:
  self_attn.{q,k,v,o}_proj -> attn.w{q,k,v,o};  self_attn.{q,k}_norm -> attn.{q,k}_norm
  (LLaMA / Qwen3 / OLMoE `attention_bias` also biases o_proj, which moelab lacks: it must be zero)
  input_layernorm -> attn_norm;  post_attention_layernorm -> ffn_norm
  mlp.{gate,up,down}_proj -> ffn.gate_up (gate rows first), ffn.down
  MoE: router <- mlp.gate (Mixtral: block_sparse_moe.gate); expert j <- experts.j.{gate,up,down}_proj
  (Mixtral: w1 gate, w3 up, w2 down), or the fused experts.{gate_up_proj, down_proj} layout;
  shared experts <- mlp.shared_expert(s); shared gate <- mlp.shared_expert_gate
DeepSeek-V2/V3 (MLA, `moelab.trainers.model.MLA`):
  self_attn.q_proj -> attn.wq, or q_a_proj / q_a_layernorm / q_b_proj -> attn.wq_a / q_norm / wq_b;
  kv_a_proj_with_mqa -> attn.wkv_a; kv_a_layernorm -> attn.kv_norm; kv_b_proj -> attn.wkv_b; o_proj -> attn.wo
  (`attention_bias` biases q_a_proj, kv_a_proj_with_mqa and o_proj: each must be zero). DeepSeek's weights
  rotate the pairs (2i, 2i+1) of the rope features (V2 always, V3 with `rope_interleave`, its default), moelab
  the pairs (i, i + r/2): the rope rows of every query head and the shared rope-key rows of kv_a_proj_with_mqa
  are reordered by `rope_rows`, which leaves every attention score unchanged.
  mlp.gate.e_score_correction_bias (V3) -> ffn.router.expert_bias (top-k selection bias, not trained).
  DeepSeek-V3 multi-token prediction: module j (0-based) is stored as layer num_hidden_layers + j, DeepSeek's
  layout: enorm -> mtp.j.embed_norm, hnorm -> hidden_norm, eh_proj -> proj, shared_head.norm -> out_norm, the
  decoder-layer names -> mtp.j.block; its embed_tokens / shared_head.head copies must equal the model's
  embedding / head, which moelab shares with it. A config.json that announces `num_nextn_predict_layers`
  while the files hold none of those tensors (transformers' DeepseekV3ForCausalLM has no MTP module and saves
  none) loads as the main model alone: mtp_depth 0, the logits are the same.
Refused: quantized checkpoints (`quantization_config`, e.g. DeepSeek-V3's FP8 release: dequantize first),
YaRN RoPE scaling (`rope_scaling`), and the config fields `ModelConfig.from_hf_config` names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from moelab.trainers.config import MLA_FAMILIES, ModelConfig
from moelab.trainers.model import Transformer

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek", "deepseek_v2", "deepseek_v3")


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
    if hf.get("quantization_config"):
        # the weights would be FP8/INT blocks plus scale tensors: loading them as numbers changes the function
        quant = hf["quantization_config"]
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise HFLoadError(f"{Path(path) / 'config.json'}: quantization_config (quant_method {method!r}): quantized "
                          f"checkpoints are not supported; allowed: absent (dequantize to bfloat16/float32 first)")
    cfg = ModelConfig.from_hf_config(hf)
    tensors = _Tensors(Path(path))
    cfg = _present_mtp(cfg, tensors, Path(path))
    model = Transformer(cfg)  # its own init is overwritten by the checkpoint below
    state = _state_dict(cfg, hf, tensors, model)
    # expert_bias: DeepSeek-V3 stores it (e_score_correction_bias); the other families have none, so it stays 0
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


def _present_mtp(cfg: ModelConfig, t: _Tensors, root: Path) -> ModelConfig:
    """`cfg` with mtp_depth cut to the MTP modules the files hold: all announced ones, or none (transformers
    saves none: its model has no MTP module). Some but not all: HFLoadError naming the first missing depth."""
    if not cfg.mtp_depth:
        return cfg
    held = [any(k.startswith(f"model.layers.{cfg.n_layers + j}.") for k in t.where) for j in range(cfg.mtp_depth)]
    if not any(held):
        return dataclasses.replace(cfg, mtp_depth=0)
    if not all(held):
        j = held.index(False)
        raise HFLoadError(f"{root}: config.json announces num_nextn_predict_layers={cfg.mtp_depth} MTP modules but "
                          f"no tensor of module {j} (model.layers.{cfg.n_layers + j}.*) is in the safetensors files")
    return cfg


def load_hf_dense(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Transformer]:
    """A dense LLaMA / Mistral / Qwen2 / Qwen3 directory -> (ModelConfig, Transformer)."""
    mt = read_config(path).get("model_type")
    if mt not in DENSE_FAMILIES:
        raise HFLoadError(f"{Path(path) / 'config.json'}: model_type {mt!r} is not a dense family; allowed: "
                          f"{', '.join(DENSE_FAMILIES)} (use load_hf for {', '.join(MOE_FAMILIES)})")
    return load_hf(path, dtype)


def rope_rows(w: torch.Tensor, block: int, offset: int, rope: int, to: str) -> torch.Tensor:
    """Reorder the rope rows of a projection between DeepSeek's interleaved RoPE layout and moelab's half-split.

    w: [n * block, in], n blocks (heads) of `block` rows, each holding `rope` rotated rows at [offset, offset +
    rope) -> [n * block, in], a new tensor. to="half": interleaved pairs (2i, 2i+1) -> half-split pairs (i, i +
    rope/2), rows taken in the order 0, 2, 4, .., 1, 3, 5, .. (import); to="interleaved": the inverse (export).
    Applied alike to the query's and the key's rope rows it leaves q.k, hence attention, unchanged.
    """
    if to not in ("half", "interleaved"):
        raise ValueError(f"rope_rows to: got {to!r}; allowed: 'half', 'interleaved'")
    if w.shape[0] % block or offset + rope > block:
        raise ValueError(f"rope_rows: {w.shape[0]} rows are not blocks of {block} with rope rows at "
                         f"[{offset}, {offset + rope})")
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    if to == "interleaved":
        perm = torch.argsort(perm)
    idx = torch.arange(w.shape[0]).view(-1, block).clone()  # [n, block] source row of every output row
    idx[:, offset:offset + rope] = idx[:, offset:offset + rope][:, perm]
    return w[idx.reshape(-1)]


def _state_dict(cfg: ModelConfig, hf: dict, t: _Tensors, model: Transformer) -> dict[str, torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    take = _Taker(cfg, hf, t, shapes, out)
    take("embed.weight", "model.embed_tokens.weight")
    take("norm.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in t:
        t.used.add("lm_head.weight")  # tied: transformers ignores a stored copy of the head as well
    for i in range(cfg.n_layers):
        take.block(f"model.layers.{i}.", f"layers.{i}.", cfg.is_moe_layer(i))
    for j in range(cfg.mtp_depth):
        take.mtp(j)
    return out


class _Taker:
    """Fills `out` (moelab name -> tensor) from the checkpoint, one tensor or one block at a time; shapes are
    the moelab model's, checked against every tensor read."""

    def __init__(self, cfg: ModelConfig, hf: dict, t: _Tensors, shapes: dict, out: dict[str, torch.Tensor]):
        self.cfg, self.mt, self.t, self.shapes, self.out = cfg, hf["model_type"], t, shapes, out
        # DeepSeek's RoPE layout: V2 rotates interleaved pairs always, V3 unless rope_interleave is false
        self.interleaved = self.mt in MLA_FAMILIES and (self.mt == "deepseek_v2" or hf.get("rope_interleave", True))

    def __call__(self, dst: str, src: str) -> None:
        self.out[dst] = self.t.get(src, self.shapes[dst])

    def glu(self, dst: str, gate: str, up: str) -> None:
        """moelab keeps gate and up stacked in one [2*width, d] matrix, gate rows first."""
        half = (self.shapes[dst][0] // 2, self.shapes[dst][1])
        self.out[dst] = torch.cat([self.t.get(gate, half), self.t.get(up, half)])

    def zero_bias(self, name: str, size: int, why: str) -> None:
        """A bias moelab's layer lacks: fine (and consumed) only when absent or zero."""
        if name in self.t and self.t.get(name, (size,)).count_nonzero():
            raise HFLoadError(f"{self.t.where[name]}: tensor {name!r} is non-zero; {why}, so this checkpoint "
                              f"cannot be loaded exactly")

    def block(self, src: str, dst: str, moe: bool) -> None:
        """One decoder layer: HF names under `src` ("model.layers.3.") -> moelab names under `dst`."""
        cfg, t = self.cfg, self.t
        self(dst + "attn_norm.weight", src + "input_layernorm.weight")
        self(dst + "ffn_norm.weight", src + "post_attention_layernorm.weight")
        if cfg.attention == "mla":
            self.mla(src + "self_attn.", dst + "attn.")
        else:
            for p in "qkvo":
                self(dst + f"attn.w{p}.weight", src + f"self_attn.{p}_proj.weight")
                if cfg.qkv_bias and p != "o":
                    self(dst + f"attn.w{p}.bias", src + f"self_attn.{p}_proj.bias")
            # `attention_bias` (LLaMA, Qwen3, OLMoE) biases o_proj too; moelab's output projection has none,
            # which is exact only while that bias is zero (as moelab's own exports write it)
            self.zero_bias(src + "self_attn.o_proj.bias", cfg.d_model, "moelab's attention output projection "
                           "has no bias")
            if cfg.qk_norm != "none":
                self(dst + "attn.q_norm.weight", src + "self_attn.q_norm.weight")
                self(dst + "attn.k_norm.weight", src + "self_attn.k_norm.weight")
        if not moe:
            self.glu(dst + "ffn.gate_up.weight", src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
            self(dst + "ffn.down.weight", src + "mlp.down_proj.weight")
            return
        mlp = src + ("block_sparse_moe." if self.mt == "mixtral" else "mlp.")
        self(dst + "ffn.router.weight", mlp + "gate.weight")
        if self.mt == "deepseek_v3":
            self(dst + "ffn.router.expert_bias", mlp + "gate.e_score_correction_bias")
        self.out[dst + "ffn.w_gate_up"], self.out[dst + "ffn.w_down"] = self.experts(mlp, dst)
        if cfg.moe.n_shared:
            shared = mlp + ("shared_expert." if self.mt == "qwen2_moe" else "shared_experts.")
            self.glu(dst + "ffn.shared.gate_up.weight", shared + "gate_proj.weight", shared + "up_proj.weight")
            self(dst + "ffn.shared.down.weight", shared + "down_proj.weight")
        if cfg.moe.shared_gate:
            self(dst + "ffn.shared_gate.weight", mlp + "shared_expert_gate.weight")
        elif mlp + "shared_expert_gate.weight" in t:
            t.used.add(mlp + "shared_expert_gate.weight")  # gates a shared expert of width 0: no effect

    def mla(self, src: str, dst: str) -> None:
        """DeepSeek-V2/V3 attention under `src` ("model.layers.3.self_attn.") -> moelab MLA under `dst`."""
        cfg, t = self.cfg, self.t
        nope, rope, kv = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.kv_rank

        def rotated(dst_name: str, src_name: str, block: int, offset: int) -> None:
            w = t.get(src_name, self.shapes[dst_name])
            self.out[dst_name] = rope_rows(w, block, offset, rope, "half") if self.interleaved else w

        q = "wq_b" if cfg.q_lora_rank else "wq"
        if cfg.q_lora_rank:
            self(dst + "wq_a.weight", src + "q_a_proj.weight")
            self(dst + "q_norm.weight", src + "q_a_layernorm.weight")
        rotated(dst + f"{q}.weight", src + ("q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight"),
                nope + rope, nope)  # per head [nope | rope] rows
        rotated(dst + "wkv_a.weight", src + "kv_a_proj_with_mqa.weight", kv + rope, kv)  # [latent | rope key]
        self(dst + "kv_norm.weight", src + "kv_a_layernorm.weight")
        self(dst + "wkv_b.weight", src + "kv_b_proj.weight")
        self(dst + "wo.weight", src + "o_proj.weight")
        for name, size in (("q_a_proj", cfg.q_lora_rank), ("kv_a_proj_with_mqa", kv + rope), ("o_proj", cfg.d_model)):
            self.zero_bias(src + f"{name}.bias", size, f"moelab's MLA has no bias on {name}")

    def experts(self, mlp: str, dst: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed experts -> (w_gate_up [E, 2 d_e, d], w_down [E, d, d_e])."""
        cfg, t, shapes = self.cfg, self.t, self.shapes
        E, d, de = cfg.moe.n_experts, cfg.d_model, cfg.d_expert
        fused = mlp + "experts.gate_up_proj"
        if fused in t:  # the stacked layout some exporters write: [E, 2*de, d] and [E, d, de]
            return (t.get(fused, shapes[dst + "ffn.w_gate_up"]),
                    t.get(mlp + "experts.down_proj", shapes[dst + "ffn.w_down"]))
        names = ("w1", "w3", "w2") if self.mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        gate_up, down = [], []
        for j in range(E):
            e = f"{mlp}experts.{j}."
            gate_up.append(torch.cat([t.get(e + f"{names[0]}.weight", (de, d)),
                                      t.get(e + f"{names[1]}.weight", (de, d))]))
            down.append(t.get(e + f"{names[2]}.weight", (d, de)))
        return torch.stack(gate_up), torch.stack(down)

    def mtp(self, j: int) -> None:
        """DeepSeek-V3 MTP module j, stored as layer num_hidden_layers + j (DeepSeek's layout)."""
        cfg, t = self.cfg, self.t
        src, dst = f"model.layers.{cfg.n_layers + j}.", f"mtp.{j}."
        self(dst + "embed_norm.weight", src + "enorm.weight")
        self(dst + "hidden_norm.weight", src + "hnorm.weight")
        self(dst + "proj.weight", src + "eh_proj.weight")
        self(dst + "out_norm.weight", src + "shared_head.norm.weight")
        self.block(src, dst + "block.", cfg.mtp_is_moe)
        # moelab's MTP modules share the model's embedding and head; DeepSeek stores a copy of each per module
        head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        copies = ((src + "embed_tokens.weight", "model.embed_tokens.weight"), (src + "shared_head.head.weight", head))
        for copy, own in copies:
            if copy in t and not torch.equal(t.get(copy, (cfg.vocab_size, cfg.d_model)),
                                              t.get(own, (cfg.vocab_size, cfg.d_model))):
                raise HFLoadError(f"{t.where[copy]}: tensor {copy!r} differs from {own!r}; moelab's MTP modules "
                                  f"share the model's embedding and output head, so they must be equal")
