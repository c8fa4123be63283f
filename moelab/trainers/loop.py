"""One training run: train / eval steps, metrics, checkpoints and exact resume.

Exact resume rests on two facts: the batch of step i depends only on (seed, i) (see `data.py`), and the
checkpoint holds everything else that changes (weights, router biases, AdamW moments, the step). So the loss
trajectory after `--resume` equals the uninterrupted one.

The same Trainer runs on many ranks (torchrun, Ray Train) when given a `parallel.Parallel`: each rank
trains on its slice of every global micro-batch with an FSDP2 + expert-parallel model (see `parallel.py`),
built on `meta` and initialised shard by shard (`_build_model`), its slices built by the rank itself, ahead,
on a background thread (`data.rank_batches`, `data.Prefetcher`);
losses, gradient norm and MoE statistics are reduced over all ranks; rank 0 alone writes metrics, the
summary and prints. Checkpoints are then sharded `torch.distributed.checkpoint` (DCP) directories
`ckpt-<step>/` that load at any world size or EP size, a single process included. A single process keeps
the `checkpoint.pt` file (torch.save) and can also resume from a DCP directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import json
import math
import os
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from moelab.trainers.ac import apply_ac
from moelab.trainers.config import ConfigError, RunConfig, to_dict
from moelab.trainers.data import Batch, Prefetcher, TokenSource, build_source, rank_batches
from moelab.trainers.hardware import peak_flops
from moelab.trainers.model import Transformer, meta_model
from moelab.trainers.moe import domain_expert_counts
from moelab.trainers.optim import build_optimizer, set_lr

if TYPE_CHECKING:
    from moelab.trainers.parallel import Parallel

CHECKPOINT = "checkpoint.pt"
DCP_PREFIX = "ckpt-"  # sharded checkpoints: <out>/ckpt-<step, 8 digits>/ (complete once meta.json exists)
DCP_META = "meta.json"
# Test hook: `MOELAB_FAULT_NAN_AT_STEP=N` makes step N's loss NaN, to exercise the divergence path end to end.
FAULT_NAN_ENV = "MOELAB_FAULT_NAN_AT_STEP"


COMPILE_BACKEND_ENV = "MOELAB_COMPILE_BACKEND"  # torch.compile backend of train.compile (default inductor)


def compile_blocks(model: Transformer, backend: str | None = None) -> Transformer:
    """`train.compile`: torch.compile each block (main layers and the MTP modules' blocks) in place.

    Per block rather than the whole model: every block has the same code, so one compilation serves all of
    them, and the embedding, head and loss stay eager. In place (`nn.Module.compile`) rather than wrapped, so
    parameter names, state dicts and checkpoints are those of an uncompiled model. The MoE experts run as a
    custom op there (`moelab.kernels.custom_op`), so a block compiles to one graph; with expert parallelism
    (ep > 1) the token dispatch, whose all-to-all sizes come from the routing, splits it in a few. Not
    `fullgraph=True`: under FSDP the block's pre/post-forward hooks run eagerly around the graph (Dynamo
    skips them), and the EP dispatch runs eagerly between graphs. Compilation happens at the
    first forward; `backend` (default $MOELAB_COMPILE_BACKEND, else "inductor") is any torch.compile backend
    ("aot_eager": the graphs without code generation, for tests)."""
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"${COMPILE_BACKEND_ENV}: got {backend!r}; allowed: {', '.join(sorted(known))}")
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        block.compile(backend=backend)
    return model


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: refused (it holds pickled objects), unreadable, or written for a
    different model. The message names the file and, for a mismatch, the tensor."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss is {loss}. Lower optim.lr, raise "
                         f"optim.warmup_steps or set optim.grad_clip.")
        self.step, self.loss = step, loss


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: got {name!r}, but no CUDA device is visible; allowed here: 'cpu', 'auto'")
    return dev


def autocast_dtype(rc: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, plain fp32 on CPU."""
    if rc.train.dtype == "bfloat16" or (rc.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint `--resume PATH` means: a `checkpoint.pt` file, a DCP directory, or the newest complete
    one of either kind inside a run directory. FileNotFoundError when there is none."""
    path = Path(path)
    if path.is_file() or (path / ".metadata").exists():
        return path
    found = []
    if path.is_dir():
        if (path / CHECKPOINT).is_file():
            found.append(((path / CHECKPOINT).stat().st_mtime, path / CHECKPOINT))
        for d in path.glob(DCP_PREFIX + "*"):
            if (d / DCP_META).is_file():
                found.append(((d / DCP_META).stat().st_mtime, d))
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return max(found)[1]


def _torch_load(path: Path | io.BytesIO, where: str, map_location: Any = "cpu") -> Any:
    """torch.load that runs no pickled code (weights_only) and says what was wrong with the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused: the file holds pickled Python objects besides tensors and plain "
                              f"values, which could run code when loaded; moelab checkpoints never do. Not loaded "
                              f"({str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated, or not written by torch.save): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _shape(v: Any) -> list[int]:
    return list(v.shape) if hasattr(v, "shape") else list(v)


def check_state_dict(got: dict[str, Any], want: dict[str, Any], where: str,
                     configs: tuple[dict, dict] | None = None) -> None:
    """Raise CheckpointError naming the first tensor that is missing, unexpected or of another shape.
    Values are tensors or shapes. `configs`: (the checkpoint's model config, this run's), to name the
    settings that differ."""
    problem = None
    for k, v in want.items():
        if k not in got:
            problem = f"tensor {k!r} is missing from the checkpoint"
        elif _shape(got[k]) != _shape(v):
            problem = f"tensor {k!r} has shape {_shape(got[k])} in the checkpoint and {_shape(v)} in this model"
        if problem:
            break
    if problem is None:
        extra = [k for k in got if k not in want]
        if not extra:
            return
        problem = f"tensor {extra[0]!r} is in the checkpoint but not in this model" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    hint = ""
    if configs is not None:
        diff = _config_diff(*configs, prefix="model")
        if diff:
            hint = "; the checkpoint was written with " + ", ".join(f"{k}={a!r} (this run: {b!r})"
                                                                    for k, (a, b) in list(diff.items())[:4])
    raise CheckpointError(f"{where}: the checkpoint does not fit this model: {problem}{hint}")


def _config_diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested config dicts (model section)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in dict.fromkeys([*a, *b]):
            out.update(_config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k))
        return out
    return {} if a == b else {prefix: (a, b)}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, which torch.distributed.checkpoint reads with plain pickle.load:
    only the plain records DCP writes there (its metadata dataclasses and enums, torch.Size, dtypes,
    layouts, paths) may be named; any other global (os.system, ...) is refused before it can be called."""

    _MODULES = ("torch.distributed.checkpoint.",)
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        if (module, name) in self._NAMES or (module == "torch" and isinstance(obj, torch.dtype)):
            return obj
        if module.startswith(self._MODULES) and isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint's .metadata")


def _dcp_classes():
    """A DCP reader and load planner that run no pickled code: the metadata goes through
    _DcpMetadataUnpickler, and non-tensor values (optimizer hyper-parameters) through a weights_only load
    before DCP's own load of the same bytes."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _DcpMetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            data = value.getvalue()
            torch.load(io.BytesIO(data), weights_only=True)  # raises UnpicklingError on any other global
            super().load_bytes(read_item, io.BytesIO(data))

    return SafeReader, SafePlanner


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: a checkpoint is whole or absent, never half-written."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_metrics_jsonl(path: Path, *, partial_last: bool = True) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file. A last line without its newline that does not parse is the row a
    killed run was writing: dropped when `partial_last` (its step is recomputed after a resume). Any other
    line that is not a JSON object with a `step` raises ValueError naming the file and the line."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e}); metrics.jsonl holds one JSON object per line") from None
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last_unterminated = i == len(lines)  # text.split leaves "" after a final newline
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if last_unterminated and partial_last:
                break
            raise ValueError(f"{path}:{i}: unreadable metrics line ({e}): {line[:80]!r}; remove or fix that "
                             f"line, or start a fresh run with another --out") from None
        rows.append(row)
    return rows


@dataclass
class StepStats:
    """MoE statistics summed over the steps since the last log line. They stay on the device (float64 sums,
    which add the layers' float32 values exactly as Python floats would) until `Trainer.moe_metrics` reads
    them, once per log line."""

    load: list[torch.Tensor] = field(default_factory=list)  # per MoE layer: slots per expert [E]
    # per MoE layer: slots per (domain, expert) [n_domains, E] int64; empty when batches carry no domains
    domain: list[torch.Tensor] = field(default_factory=list)
    dropped: torch.Tensor | float = 0.0  # slots dropped by the capacity limit
    slots: torch.Tensor | float = 0.0  # slots routed (a host number in one process: token counts are known)
    entropy: torch.Tensor | float = 0.0  # router entropy, summed over layers and micro-steps
    n_entropy: torch.Tensor | int = 0


class Trainer:
    """Trains one model described by a RunConfig. `run()` returns the final summary dict.

    `report(metrics, checkpoint | None)` is called at every log step (the Ray worker hooks in here); on
    many ranks it is called on every rank with the same, all-reduced metrics.
    `model`: start from these weights (e.g. an upcycled MoE) instead of a fresh initialisation; its
    architecture must be `rc.model`.
    `parallel`: the rank layout (`parallel.init_parallel`); None or a world of one = a single process.
    """

    def __init__(self, rc: RunConfig, out_dir: str | Path, *, metrics_jsonl: str | Path | None = None,
                 progress: bool | None = None, report: Callable[[dict, Path | None], None] | None = None,
                 model: Transformer | None = None, parallel: "Parallel | None" = None):
        self.rc = rc.validate()
        self.par = parallel if parallel is not None and parallel.world_size > 1 else None
        self.is_main = self.par is None or self.par.is_main
        self.out_dir = Path(out_dir)
        self.metrics_path = Path(metrics_jsonl) if metrics_jsonl else self.out_dir / "metrics.jsonl"
        if self.metrics_path.is_dir():
            raise ConfigError(f"--metrics-jsonl: {self.metrics_path} is a directory; allowed: a file path "
                              f"(e.g. {self.metrics_path / 'metrics.jsonl'})")
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        self.report = report
        if self.par is None and rc.train.ep > 1:
            raise ConfigError(f"train.ep: got {rc.train.ep} in a single process; allowed: 1, or run on "
                              f"several ranks (torchrun --nproc_per_node N -m moelab train ..., N a multiple "
                              f"of ep; or Ray Train)")
        self.device = self.par.device if self.par else resolve_device(rc.train.device)
        self.amp_dtype = autocast_dtype(rc, self.device)
        self.source: TokenSource = build_source(rc.data, rc.data.seed)
        if self.source.vocab_size > rc.model.vocab_size:
            raise ConfigError(f"model.vocab_size: got {rc.model.vocab_size}; allowed: >= {self.source.vocab_size}, "
                              f"the vocabulary of data.source={rc.data.source!r}")
        if model is not None and model.cfg != rc.model:
            raise ConfigError("Trainer(model=...): the model's config differs from rc.model")
        if self.par:
            from moelab.trainers.parallel import check_batch

            if rc.train.ep != self.par.ep:
                raise ConfigError(f"train.ep: got {rc.train.ep}, but the process mesh has ep={self.par.ep}")
            check_batch(rc, self.par)
        self.model: Transformer = self._build_model(model)
        self.opt = build_optimizer(self.model, rc.optim)
        # Sequences per micro-step over all ranks. On W ranks train.micro_batch_size counts per rank, so W
        # ranks at micro m train exactly like one process at micro m x W (0: the whole batch at once).
        world = self.par.world_size if self.par else 1
        self.micro = rc.train.micro_batch_size * world if rc.train.micro_batch_size else rc.train.batch_size
        self.total_steps = rc.total_steps()
        self.step = 0
        self.tokens_per_step = rc.train.batch_size * rc.train.seq_len
        self.flops_per_token = rc.model.flops_per_token(rc.train.seq_len)
        self.wall_offset = 0.0  # wall seconds of earlier attempts (resume)
        self.checkpoint_path: Path | None = None  # the newest checkpoint written or loaded
        self._prefetch: Prefetcher | None = None  # set while `run` trains (`_prefetching`)

    def _build_model(self, model: Transformer | None) -> Transformer:
        """The model this rank trains. Unless given one, it is built on `meta`, sharded (many ranks), then
        materialised on the device and filled shard by shard: a fresh initialisation (`init_weights`, the
        values one process draws) or `upcycle.source` (`upcycle.init_from_source`). No rank ever holds the
        whole model, and none draws what it does not keep."""
        # FSDP gathers parameters in bf16 on CUDA (gradients reduced in fp32); fp32 on CPU.
        param_dtype = self.amp_dtype if self.device.type == "cuda" else None
        ac = self.rc.train.activation_checkpointing  # applied to the plain model, before FSDP wraps its blocks
        if model is not None:
            model = apply_ac(model.to(self.device), ac)
            if self.rc.train.compile:  # per block, after AC and before FSDP wraps the blocks (torchtitan's order)
                compile_blocks(model)
            if self.par:
                from moelab.trainers.parallel import parallelize

                parallelize(model, self.par, param_dtype)
            return model
        model = apply_ac(meta_model(self.rc.model), ac)
        if self.rc.train.compile:  # lazily, at the first forward: materialising the weights below is unaffected
            compile_blocks(model)
        if self.par:
            from moelab.trainers.parallel import parallelize

            parallelize(model, self.par, param_dtype)
        model.to_empty(device=self.device)
        if not self.rc.upcycle.source:
            model.init_weights(self.rc.train.seed)
            return model
        from moelab.trainers.upcycle import init_from_source  # continue from, or upcycle, another model

        where = f"upcycle.source {self.rc.upcycle.source}"
        try:
            init_from_source(model, self.rc)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{where}: refused: the file holds pickled Python objects besides tensors "
                                  f"and plain values, which could run code when loaded. Not loaded "
                                  f"({str(e).splitlines()[0][:200]})") from None
        except (EOFError, RuntimeError) as e:
            if "PytorchStreamReader" not in str(e) and not isinstance(e, EOFError):
                raise
            raise CheckpointError(f"{where}: not a readable checkpoint (truncated, or not written by "
                                  f"torch.save): {str(e).splitlines()[0][:200]}") from None
        return model

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """A single process: `checkpoint.pt` (torch.save, atomic). Many ranks: a DCP directory."""
        if self.par:
            return self._save_dcp()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / CHECKPOINT
        save_atomic({"model": self.model.state_dict(), "optim": self.opt.state_dict(), "step": self.step,
                     "wall_s": self.wall_s(), "config": to_dict(self.rc)}, path)
        self.checkpoint_path = path
        return path

    def _save_dcp(self) -> Path:
        """Every rank writes its own shards of weights and AdamW state (FQN-keyed, so they reload at any
        layout); rank 0 writes `meta.json` last, which marks the directory complete. Older ones are removed."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = self.out_dir / f"{DCP_PREFIX}{self.step:08d}"
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        if self.is_main:
            shutil.rmtree(path, ignore_errors=True)
        self.par.barrier()
        path.mkdir(parents=True, exist_ok=True)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if self.is_main:
            meta = {"step": self.step, "wall_s": self.wall_s(), "world_size": self.par.world_size,
                    "ep": self.par.ep, "config": to_dict(self.rc)}
            tmp = path / (DCP_META + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, path / DCP_META)
        self.par.barrier()
        for old in self.out_dir.glob(DCP_PREFIX + "*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        self.checkpoint_path = path
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from `path` (see `find_checkpoint`): weights, router biases, AdamW state, step. Loads no
        pickled code; a checkpoint of another model raises CheckpointError naming the first tensor that
        differs."""
        path = find_checkpoint(path)
        where = f"--resume {path}"
        if path.is_dir():
            meta = self._load_dcp(path)
        else:
            meta = _torch_load(path, where, "cpu" if self.par else self.device)
            if not isinstance(meta, dict) or not {"model", "optim", "step"} <= set(meta):
                raise CheckpointError(f"{where}: not a moelab checkpoint (no model / optim / step entries)")
            configs = (meta.get("config", {}).get("model", {}), to_dict(self.rc)["model"])
            if self.par:
                self._load_full(meta, where, configs)
            else:
                check_state_dict(meta["model"], self.model.state_dict(), where, configs)
                self.model.load_state_dict(meta["model"])
                self._load_optim(self.opt, meta["optim"], where)
        self.step = meta["step"]
        self.wall_offset = meta.get("wall_s", 0.0)
        self.checkpoint_path = path
        if self.is_main:
            self._truncate_metrics(self.step)

    @staticmethod
    def _load_optim(opt: torch.optim.Optimizer, state: dict, where: str) -> None:
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{where}: the optimizer state does not fit this run's parameter groups "
                                  f"({type(e).__name__}: {e})") from None

    def _load_dcp(self, path: Path) -> dict:
        """Load a DCP directory into this layout (DCP reshards: any saved world/EP size, or one process)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        where = f"--resume {path}"
        try:
            meta = json.loads((path / DCP_META).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{where}: {DCP_META} is missing or unreadable ({e}); the checkpoint was not "
                                  f"finished") from None
        SafeReader, SafePlanner = _dcp_classes()
        model_sd, optim_sd = get_state_dict(self.model, self.opt)  # this layout's shards, to be filled
        try:
            stored = SafeReader(path).read_metadata().state_dict_metadata
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{where}: refused: its .metadata names code to run ({e}). Not loaded") from None
        except (OSError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{where}: unreadable .metadata ({type(e).__name__}: {e})") from None
        got = {k[len("model."):]: torch.Size(v.size) for k, v in stored.items()
               if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
        check_state_dict(got, model_sd, where, (meta.get("config", {}).get("model", {}), to_dict(self.rc)["model"]))
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
                warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
                dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=self.par is None)
        except (dcp.CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
            # DCP wraps each rank's failure in a CheckpointException (a BaseException) holding its traceback.
            text = str(e)
            if "UnpicklingError" in text or "Weights only load failed" in text:
                raise CheckpointError(f"{where}: refused: a stored value is a pickled object that could run "
                                      f"code when loaded. Not loaded") from None
            raise CheckpointError(f"{where}: could not load ({type(e).__name__}: {text.splitlines()[-1][:300]})"
                                  ) from None
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return meta

    def _load_full(self, state: dict, where: str = "--resume", configs: tuple[dict, dict] | None = None) -> None:
        """A single process's torch.save checkpoint into a sharded model: rebuild it whole on the CPU, take
        FQN-keyed state dicts, and let every rank keep its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        plain = meta_model(self.rc.model)
        plain.to_empty(device="cpu")  # storage without draws: every value is loaded below
        check_state_dict(state["model"], plain.state_dict(), where, configs)
        plain.load_state_dict(state["model"])
        opt = build_optimizer(plain, self.rc.optim)
        self._load_optim(opt, state["optim"], where)
        model_sd, optim_sd = get_state_dict(plain, opt)
        set_state_dict(self.model, self.opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))

    def _truncate_metrics(self, step: int) -> None:
        """Drop logged rows past the checkpoint: they are recomputed, identically, after resuming. A fresh run
        (step 0) starts an empty log without reading the old one."""
        if not self.metrics_path.exists():
            return
        keep = [] if step == 0 else [r for r in read_metrics_jsonl(self.metrics_path) if r["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics_path)

    # -- steps --------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, tokens: torch.Tensor, mtp: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                      dict[str, torch.Tensor]]:
        """tokens: [B, S+1] -> (objective, cross-entropy, moe and mtp losses). `mtp=False` (evaluation) skips
        the MTP modules: the cross-entropy is the next-token one either way."""
        inp, tgt = tokens[:, :-1], tokens[:, 1:]
        run_mtp = mtp and self.rc.model.mtp_depth > 0
        with self._autocast():
            # Given the targets, the model also runs its MTP modules, inside its own forward (under FSDP the
            # shared embedding and head are gathered only there), and leaves their losses in `mtp_ce`.
            logits = self.model(inp, tgt) if run_mtp else self.model(inp)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        # = model.moe_losses(), without touching parameters (FSDP may have resharded them by now).
        layers = [m for _, m in self.model.moe_layers() if m.aux_loss is not None]
        zero = ce.new_zeros(())
        moe = {"aux_loss": sum((m.aux_loss for m in layers), zero), "z_loss": sum((m.z_loss for m in layers), zero),
               "seq_aux_loss": sum((m.seq_aux_loss for m in layers), zero)}
        m = self.rc.model.moe
        obj = (ce + m.aux_loss_coef * moe["aux_loss"] + m.z_loss_coef * moe["z_loss"]
               + m.seq_aux_loss_coef * moe["seq_aux_loss"])
        # DeepSeek-V3 §2.2: L_MTP = (lambda / D) sum_j CE_j. `mtp_loss` is the unweighted mean over the D depths
        # (logged like aux_loss, before its weight).
        mtp_ce = self.model.mtp_ce if run_mtp else []
        moe["mtp_loss"] = sum(mtp_ce, zero) / len(mtp_ce) if mtp_ce else zero
        obj = obj + self.rc.train.mtp_loss_weight * moe["mtp_loss"]
        return obj, ce, moe

    def train_step(self, stats: StepStats) -> dict[str, float]:
        """One optimiser step over `batch_size` sequences in micro-batches. Returns scalar metrics, read from
        the device at once; raises Diverged if the loss is not finite (after the optimiser step: the check
        needs the host to read the loss). `run` calls `_step`, which reads nothing, and `_read_rows` once per
        log line."""
        return self._read_rows([self._step(stats)])

    def _layout(self) -> tuple[int, int]:
        """(rank, world size) of this process: the rows of each global batch it builds and trains on."""
        return (self.par.rank, self.par.world_size) if self.par else (0, 1)

    def _train_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of training step `step`, on the host: a function of (data seed, step,
        rank layout) alone, the rows `Parallel.local_rows` would cut from the global batch (`rank_batches`)."""
        t = self.rc.train
        return rank_batches(self.source, "train", step, t.batch_size, t.seq_len, self.micro, *self._layout())

    def _next_batches(self) -> list[Batch]:
        """Step self.step's micro-batches: from the prefetch thread inside `run`, else built here."""
        if self._prefetch is not None:
            return self._prefetch.get(self.step)
        return self._train_batches(self.step)

    @contextlib.contextmanager
    def _prefetching(self):
        """Inside: the batches of steps self.step .. total_steps-1 are built ahead on a daemon thread (two steps
        ahead at most), so the host prepares step i+1's data while step i trains. Stopped on exit, also when
        a step raises."""
        self._prefetch = Prefetcher(self._train_batches, self.step, self.total_steps, depth=2)
        try:
            yield self._prefetch
        finally:
            self._prefetch.close()
            self._prefetch = None

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch on the training device. On CUDA through pinned memory and non_blocking: a copy from
        pageable memory would make the host wait for the device's queue to drain."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _step(self, stats: StepStats) -> dict[str, Any]:
        """One optimiser step without a host read (the host can queue the next step while the device runs
        this one). Returns the step's metrics for `_read_rows`: on the device `sums` [5] (cross-entropy, aux,
        z, sequence-wise balance and MTP losses, each summed over the micro-steps) and `grad_norm`; on the
        host `lr`, `step` (the step's index) and `n_micro`."""
        t = self.rc.train
        lr = set_lr(self.opt, self.step, self.total_steps, self.rc.optim)
        micro_batches = self._next_batches()  # this rank's rows of each micro-batch of step self.step
        n_micro = len(micro_batches)
        sums = None
        for b in micro_batches:
            mb = self._to_device(b.tokens)
            # Routing per domain is counted only where the source knows each row's domain (synthetic).
            dom = self._to_device(b.domains) if b.domains is not None and self.source.n_domains else None
            obj, ce, moe = self._loss(mb)
            (obj / n_micro).backward()
            losses = torch.stack([ce.detach().float(), *(moe[k].detach().float() for k in
                                                         ("aux_loss", "z_loss", "seq_aux_loss", "mtp_loss"))])
            sums = losses if sums is None else sums + losses  # in micro-step order, as float32
            self._collect(stats, dom)
        clip = self.rc.optim.grad_clip if self.rc.optim.grad_clip > 0 else float("inf")
        if self.par:
            from moelab.trainers.parallel import clip_grad_norm

            grad_norm = clip_grad_norm(self.model.parameters(), clip, self.par)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        layers = self.model.moe_layers()
        if self.par and any(m.bias_update_rate > 0 for _, m in layers):
            # Biases move on the load of the global batch, so every rank keeps the same biases.
            loads = self.par.all_reduce(torch.stack([m.load_accum for _, m in layers]))
            for (_, m), load in zip(layers, loads):
                m.update_bias(load)
        else:
            for _, m in layers:
                m.update_bias()
        row = {"sums": sums, "grad_norm": grad_norm.detach(), "lr": lr, "step": self.step, "n_micro": n_micro}
        self.step += 1
        return row

    def _read_rows(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """The metrics of the last of `rows` (the `_step`s since the last read) as floats, from one host read
        (on many ranks after one all-reduce, so every rank sees the same, global values and agrees on
        divergence). Raises Diverged naming the first of the steps whose loss is not finite."""
        sums = torch.stack([r["sums"] for r in rows])  # [n, 5]
        if self.par:
            sums = self.par.all_reduce(sums, "mean")
        # float64 holds the float32 values exactly: the floats are those float(tensor) gives.
        vals = torch.cat([sums.double().flatten(), rows[-1]["grad_norm"].double().reshape(1)]).tolist()
        for i, r in enumerate(rows):
            loss = vals[5 * i] / r["n_micro"]
            if os.environ.get(FAULT_NAN_ENV) == str(r["step"]):  # test hook: behave as if the loss blew up
                loss = float("nan")
            if not math.isfinite(loss):
                raise Diverged(r["step"], loss)
        last, n_micro = vals[5 * (len(rows) - 1):5 * len(rows)], rows[-1]["n_micro"]
        row = {"loss": last[0] / n_micro, "aux_loss": last[1] / n_micro, "z_loss": last[2] / n_micro,
               "seq_aux_loss": last[3] / n_micro, "lr": rows[-1]["lr"], "grad_norm": vals[-1]}
        if self.rc.model.mtp_depth:
            row["mtp_loss"] = last[4] / n_micro
        return row

    def _collect(self, stats: StepStats, row_domains: torch.Tensor | None = None) -> None:
        """Add the last forward's MoE statistics to `stats`. row_domains: [B] the domain of each sequence of
        that forward (None: no per-domain counts). A layer's T tokens are B rows of T / B positions, row-major
        (see MoE.forward): S per row in the model, S - j in the MTP block of depth j."""
        layers = self.model.moe_layers()
        if not stats.load:
            stats.load = [torch.zeros_like(m.stats["load"]) for _, m in layers]
        if row_domains is not None and not stats.domain:
            K = self.source.n_domains
            stats.domain = [torch.zeros(K, m.n_experts, dtype=torch.int64, device=m.stats["load"].device)
                            for _, m in layers]
        for i, (acc, (_, m)) in enumerate(zip(stats.load, layers)):
            acc += m.stats["load"]
            if row_domains is not None:
                per_row = m.stats["topk_idx"].shape[0] // row_domains.shape[0]
                stats.domain[i] += domain_expert_counts(m.stats["topk_idx"], row_domains.repeat_interleave(per_row),
                                                        self.source.n_domains, m.n_experts)
            stats.dropped = stats.dropped + m.stats["dropped"].double()
            stats.slots += m.stats["slots"]
            stats.entropy = stats.entropy + m.stats["router_entropy"].double()
            stats.n_entropy += 1

    def _reduce_stats(self, stats: StepStats) -> StepStats:
        """MoE statistics summed over all ranks (entropy stays a mean over every rank's micro-batches), still
        on the device."""
        if not self.par or not stats.load:
            return stats
        # One all-reduce for everything; float64 holds the int64 domain counts exactly (below 2^53).
        flat = torch.cat([torch.stack(stats.load).double().flatten(),
                          *[d.double().flatten() for d in stats.domain],
                          torch.stack([torch.as_tensor(stats.dropped, dtype=torch.float64),
                                       torch.as_tensor(stats.entropy, dtype=torch.float64)])])
        flat = self.par.all_reduce(flat)
        n = sum(l.numel() for l in stats.load)
        nd = sum(d.numel() for d in stats.domain)
        loads = flat[:n].float().split([l.numel() for l in stats.load])
        domain = [c.round().long().view_as(d) for c, d in
                  zip(flat[n:n + nd].split([d.numel() for d in stats.domain]), stats.domain)]
        # Slots and entropy terms are counted on the host, and every rank routes as many tokens as the others
        # (`Parallel.local_rows`): their sums over ranks are W times the local ones.
        W = self.par.world_size
        return StepStats(load=list(loads), domain=domain, dropped=flat[n + nd], slots=stats.slots * W,
                         entropy=flat[n + nd + 1], n_entropy=stats.n_entropy * W)

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.rc.train
        losses = []
        for i in range(t.eval_batches):
            b, = rank_batches(self.source, "eval", i, self.micro, t.seq_len, self.micro, *self._layout())
            tokens = self._to_device(b.tokens)
            losses.append(self._loss(tokens, mtp=False)[1])  # the next-token loss alone
        for _, m in self.model.moe_layers():
            m.load_accum.zero_()  # eval routing must not move the aux-loss-free biases
        per_batch = torch.stack(losses).double()  # read once, after the last batch
        if self.par:
            return float(self.par.all_reduce(per_batch, "mean").mean())
        return sum(per_batch.tolist()) / len(losses)

    def wall_s(self) -> float:
        return self.wall_offset + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    @staticmethod
    def moe_metrics(stats: StepStats) -> dict[str, Any]:
        """Expert load per layer (fractions), imbalance (max/mean, averaged over layers), drop fraction; with
        domains also `expert_domain`: per layer the routed slots per (domain, expert), [n_domains][E] ints."""
        if not stats.load:
            return {}
        fracs = [l / l.sum().clamp_min(1) for l in stats.load]  # float32, on the device
        imb = torch.stack([l.max() / l.mean().clamp_min(1e-9) for l in stats.load])
        scalars = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (stats.dropped, stats.entropy)])
        # One host read for the whole line; float64 holds the float32 values and the int64 counts exactly, so
        # the numbers are those a read per tensor would give.
        vals = torch.cat([torch.cat(fracs).double(), imb.double(), scalars,
                          *[d.double().flatten() for d in stats.domain]]).tolist()
        it = iter(vals)
        fracs = [[next(it) for _ in range(l.numel())] for l in stats.load]
        imb = [next(it) for _ in stats.load]
        dropped, entropy = next(it), next(it)
        out = {"imbalance": sum(imb) / len(imb), "drop_frac": dropped / max(stats.slots, 1.0),
               "router_entropy": entropy / max(stats.n_entropy, 1), "expert_load": fracs}
        if stats.domain:
            out["expert_domain"] = [[[int(next(it)) for _ in range(d.shape[1])] for _ in range(d.shape[0])]
                                    for d in stats.domain]
        return out

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t = self.rc.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.rc), indent=2))
            self._truncate_metrics(self.step)  # a fresh run starts a fresh log; a resumed one drops replayed rows
        peak = peak_flops(self.device)  # None: a GPU of unknown peak (warned once); MFU is then NaN
        peak = peak * (self.par.world_size if self.par else 1) if peak else float("nan")  # MFU: of all devices
        # The first log window of a process holds the warm-up (torch.compile, Triton autotuning, allocator
        # growth, first-touch page faults): its MFU is NaN rather than a figure that understates the run.
        first_window = True
        self._t0 = time.perf_counter()
        window_t, window_tokens = time.perf_counter(), 0
        stats = StepStats()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        with self._prefetching(), open(self.metrics_path, "a") if self.is_main else contextlib.nullcontext() as mf:
            pending: list[dict[str, Any]] = []  # the steps since the last read, their metrics on the device
            while self.step < self.total_steps:
                pending.append(self._step(stats))
                window_tokens += self.tokens_per_step
                s = self.step
                if bar:
                    bar.update(1)
                done = s == self.total_steps
                if s % t.log_every == 0 or done:
                    # The one host read of the interval's losses (and divergence check); it waits for the device,
                    # so the window's time below covers the device's work.
                    row, pending = self._read_rows(pending), []
                    if bar:
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    row.update(step=s, tokens=s * self.tokens_per_step,
                               flops=s * self.tokens_per_step * self.flops_per_token, wall_s=self.wall_s(),
                               tokens_per_s=tps,
                               mfu=float("nan") if first_window else tps * self.flops_per_token / peak,
                               max_mem_gib=self._max_mem_gib())
                    first_window = False
                    row.update(self.moe_metrics(self._reduce_stats(stats)))
                    if (t.eval_every and s % t.eval_every == 0) or done:
                        row["eval_loss"] = self.evaluate()
                    if self.is_main:
                        mf.write(json.dumps(row) + "\n")
                        mf.flush()
                        if not self.progress:
                            print(self._line(row), flush=True)
                    ckpt = None
                    if (t.ckpt_every and s % t.ckpt_every == 0) or done:
                        ckpt = self.save_checkpoint()
                    if self.report:
                        self.report(row, ckpt)
                    last = row
                    stats = StepStats()
                    window_t, window_tokens = time.perf_counter(), 0
                elif t.ckpt_every and s % t.ckpt_every == 0:
                    self._read_rows(pending)  # raises Diverged first: no checkpoint of a diverged run
                    pending = []
                    self.save_checkpoint()
        if bar:
            bar.close()
        if not last and self.is_main and self.metrics_path.exists():  # resumed a run that had already finished
            rows = read_metrics_jsonl(self.metrics_path)
            last = rows[-1] if rows else {}
        summary = self.summary(last)
        if self.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in last.items() if k not in ("expert_load", "expert_domain")}
        out.update(status="finished", steps=self.step, params=self.rc.model.param_counts(),
                   flops_per_token=self.flops_per_token, metrics=str(self.metrics_path),
                   checkpoint=str(self.checkpoint_path or self.out_dir / CHECKPOINT), data=self.source.describe())
        if self.par:
            out.update(world_size=self.par.world_size, ep=self.par.ep)
        floor = getattr(self.source, "bayes_loss", None)
        if floor is not None:
            out["bayes_loss"] = floor(self.rc.train.seq_len)
        return out

    def _max_mem_gib(self) -> float:
        """Peak CUDA memory allocated by torch since the process started (or last reset its peak statistics),
        GiB, the largest over ranks; NaN on CPU, which has no such counter."""
        if self.device.type != "cuda":
            return float("nan")
        gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        if not self.par:
            return gib
        peak = torch.tensor(gib, device=self.device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=self.par.group)
        return float(peak)

    @staticmethod
    def _line(row: dict[str, Any]) -> str:
        parts = [f"step {row['step']}", f"loss {row['loss']:.4f}"]
        if "eval_loss" in row:
            parts.append(f"eval {row['eval_loss']:.4f}")
        if "mtp_loss" in row:
            parts.append(f"mtp {row['mtp_loss']:.4f}")
        mfu = row.get("mfu", float("nan"))
        parts += [f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:.0f} tok/s",
                  f"mfu {mfu:.1%}" if math.isfinite(mfu) else "mfu n/a"]
        if math.isfinite(row.get("max_mem_gib", float("nan"))):
            parts.append(f"mem {row['max_mem_gib']:.1f} GiB")
        if "imbalance" in row:
            parts.append(f"imb {row['imbalance']:.2f}")
        return " | ".join(parts)


def train(rc: RunConfig, out_dir: str | Path, *, metrics_jsonl: str | Path | None = None,
          resume: str | Path | None = None, progress: bool | None = None,
          model: Transformer | None = None, parallel: "Parallel | None" = None) -> dict[str, Any]:
    """Train one run; `resume` is a checkpoint file, DCP directory or run directory to continue from;
    `model` optional starting weights; `parallel` the rank layout (see Trainer)."""
    tr = Trainer(rc, out_dir, metrics_jsonl=metrics_jsonl, progress=progress, model=model, parallel=parallel)
    if resume:
        tr.load_checkpoint(resume)
    return tr.run()
