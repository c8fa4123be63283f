"""Sweep files: YAML -> `SweepSpec` (pydantic, strict) -> a validated list of `Trial`s.

A sweep file (every key optional except `name`; unknown keys are errors)::

    name: noise                        # [A-Za-z0-9_-]; the `sweep` partition of the results tables
    description: upcycling noise ablation
    common:                            # dotted config keys applied to EVERY trial (baselines too)
      train.steps: 300
      data.source: synthetic
    baselines:                         # dense trials, run first; `name` defaults to the preset
      - {preset: tiny}
      - {name: tiny-wide, preset: tiny, overrides: {model.d_ff: 256}}
    base:                              # the grid's starting point (omit for a baselines-only sweep)
      preset: moe-tiny
      upcycle_from: tiny               # a baseline name: each grid trial is initialised from it
      overrides: {model.moe.top_k: 2}
    axes:                              # the grid is the product of all axes
      upcycle.noise_std: [0, 1e-6, 1e-3]        # plain axis: dotted key -> values
      granularity:                              # linked axis: name -> {label: {dotted key: value}}
        G1: {model.moe.granularity: 1, model.moe.n_experts: 4, model.moe.top_k: 1}
        G2: {model.moe.granularity: 2, model.moe.n_experts: 8, model.moe.top_k: 2}
    seeds: [0, 1]                      # each seed sets train.seed (and upcycle.seed); data.seed is not varied
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, ep: 1, ray_train: false}
    storage: results                   # local directory or a pyarrow.fs URI (s3://bucket/prefix)
    max_trials: 10000                  # refuse a file that expands to more trials (a typo'd axis can mean 10^6)

Overrides are mappings of dotted config keys (`model.moe.top_k`); a nested mapping is flattened into dotted
keys, so `train: {steps: 300}` is the same as `train.steps: 300`. Besides config keys, an axis (plain or
inside a linked value) may set the two trial keys `preset` and `upcycle_from` (a baseline name, or null for
training from scratch). Floats may be written `1e-6` (YAML 1.2 style; plain PyYAML would read a string).

Order of application for one trial: preset -> `common` -> base/baseline `overrides` -> axis values ->
`train.seed`. Every trial's config goes through `load_run_config` during `expand`, so a bad value fails
before anything runs, naming the trial, the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moelab.trainers.config import PRESETS, ConfigError, RunConfig, TrainConfig, load_run_config, to_dict

__all__ = [
    "SpecError", "SweepSpec", "Base", "Baseline", "Resources", "Trial", "load_spec", "parse_spec", "expand",
    "format_trials", "list_catalogue", "catalogue_path", "CATALOGUE_DIR", "TRIAL_KEYS", "RESERVED_COLUMNS",
]

_HAS_TRAIN_EP = any(f.name == "ep" for f in dataclasses.fields(TrainConfig))
CATALOGUE_DIR = Path(__file__).resolve().parent.parent / "ablations" / "catalogue"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # sweep / baseline / trial names: path- and URI-safe
TRIAL_KEYS = ("preset", "upcycle_from")  # non-config keys an axis may set
# Columns of the `trials` table that a linked axis name must not shadow.
MAX_TRIALS = 10_000  # default `max_trials`: above it a sweep file is refused before anything is expanded
RESERVED_COLUMNS = frozenset({
    "sweep", "trial_id", "family", "name", "preset", "seed", "depends_on", "upcycle_from", "status", "attempt",
    "axis_values", "overrides", "config", "params_total", "params_active", "params_non_embedding", "flops_per_token",
    "steps", "tokens", "flops", "error", "updated_at", "model", "data", "optim", "train", "upcycle",
})


class SpecError(ValueError):
    """A sweep file is malformed or expands to an invalid trial. The message names the key."""


# ----------------------------------------------------------------------------------------------------------
# The file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # Named here (rather than pydantic's "extra inputs are not permitted") so the error lists what is allowed.
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise ValueError(f"unknown key {key!r}; allowed: {', '.join(cls.model_fields)}")
        return data


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ValueError(f"key {key!r} is not a string")
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


class Base(_Strict):
    """The grid's starting point: a preset plus dotted overrides; `upcycle_from` names a baseline."""

    preset: str = "tiny"
    upcycle_from: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _flat(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _flatten(v)


class Baseline(_Strict):
    """A dense trial (one per seed) that grid trials can be upcycled from."""

    name: str | None = None  # default: the preset
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] | None = None  # default: the sweep's seeds

    @field_validator("overrides")
    @classmethod
    def _flat(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _flatten(v)

    @property
    def key(self) -> str:
        return self.name or self.preset


class Resources(_Strict):
    """Per trial: `workers` ranks (= data-parallel x expert-parallel). A trial of several workers is a Ray Train
    run; a 1-worker trial trains inside its Tune trial (no worker group to start) unless `ray_train` is set."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    ep: int = Field(1, ge=1)  # expert-parallel degree: divides workers and every MoE trial's n_experts
    ray_train: bool = False  # run 1-worker trials as Ray Train runs too (the multi-worker path, for testing it)

    @property
    def in_tune(self) -> bool:
        """Trials train inside their Tune trial (the single-worker fast path) rather than as Ray Train runs."""
        return self.workers == 1 and not self.ray_train

    @model_validator(mode="after")
    def _ep_divides_workers(self) -> "Resources":
        if self.workers % self.ep:
            divisors = [d for d in range(1, self.workers + 1) if self.workers % d == 0]
            raise ValueError(f"ep: got {self.ep}; allowed: a divisor of resources.workers={self.workers}: "
                             f"{divisors}")
        return self


AxisValues = list[Any] | dict[str, dict[str, Any]]


class SweepSpec(_Strict):
    name: str
    description: str = ""
    common: dict[str, Any] = Field(default_factory=dict)
    base: Base | None = None
    axes: dict[str, AxisValues] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    baselines: list[Baseline] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    storage: str = "results"
    max_trials: int = Field(MAX_TRIALS, ge=1)

    @field_validator("common")
    @classmethod
    def _flat(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _flatten(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"got {v!r}; allowed: letters, digits, '_' and '-', starting with a letter or digit")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty; allowed: a non-empty list of integers")
        if len(set(v)) != len(v):
            raise ValueError(f"got {v}; allowed: distinct integers")
        return v

    @field_validator("axes", mode="before")
    @classmethod
    def _axes_shape(cls, v: Any) -> Any:
        # Checked before the union so the message says which axis is wrong, not which union branch failed.
        if not isinstance(v, dict):
            return v
        v = {name: ({str(lab): moves for lab, moves in values.items()} if isinstance(values, dict) else values)
             for name, values in v.items()}
        for name, values in v.items():
            if isinstance(values, list):
                if not values:
                    raise ValueError(f"{name}: empty axis; allowed: a non-empty list of values")
            elif isinstance(values, dict):
                if not values:
                    raise ValueError(f"{name}: empty linked axis; allowed: a non-empty mapping label -> "
                                     f"{{dotted key: value}}")
                if "." in name:
                    raise ValueError(f"{name}: a linked axis (label -> mapping) needs a name without dots")
                for label, moves in values.items():
                    if not isinstance(moves, dict) or not moves:
                        raise ValueError(f"{name}.{label}: got {moves!r}; allowed: a non-empty mapping of "
                                         f"dotted config keys to values")
            else:
                raise ValueError(f"{name}: got {values!r}; allowed: a non-empty list of values, or a mapping "
                                 f"label -> {{dotted key: value}} (linked axis)")
        return v

    @field_validator("axes")
    @classmethod
    def _flatten_linked(cls, v: dict[str, AxisValues]) -> dict[str, AxisValues]:
        return {k: ({str(lab): _flatten(m) for lab, m in vals.items()} if isinstance(vals, dict) else vals)
                for k, vals in v.items()}

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; allowed: a local directory or a URI such as s3://bucket/prefix")
        return v

    @model_validator(mode="after")
    def _grid_size(self) -> "SweepSpec":
        # Counted from the lengths alone, so a 10^6-trial file is refused at once rather than after every
        # trial's config has been built and checked.
        n_base = sum(len(b.seeds or self.seeds) for b in self.baselines)
        sizes = [len(v) for v in self.axes.values()]
        n_grid = math.prod(sizes) * len(self.seeds) if self.base is not None else 0
        if n_base + n_grid > self.max_trials:
            axes = " x ".join(f"{k} ({n})" for k, n in zip(self.axes, sizes)) or "base"
            raise ValueError(f"max_trials: the sweep expands to {n_base + n_grid:,} trials ({axes} x "
                             f"{len(self.seeds)} seed(s), plus {n_base} baseline trial(s)); allowed: at most "
                             f"max_trials={self.max_trials} (raise `max_trials` in the sweep file to run more)")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or "function-" in str(part):  # pydantic's union-branch markers
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate a parsed YAML document as a SweepSpec; errors become SpecError naming the keys."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: got {type(data).__name__}; allowed: a mapping of sweep keys "
                        f"({', '.join(SweepSpec.model_fields)})")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            where = _loc(err["loc"])
            if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                msg = f"got {err['input']!r}; {msg}"
            lines.append(f"{where}: {msg}" if where else msg)
        raise SpecError(f"{source}: " + "; ".join(dict.fromkeys(lines))) from None


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` (no dot) as a float, as YAML 1.2 does."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def list_catalogue() -> list[str]:
    """Names of the ready sweeps in moelab/ablations/catalogue (`moelab sweep NAME`)."""
    return sorted(p.stem for p in CATALOGUE_DIR.glob("*.yaml"))


def catalogue_path(name: str) -> Path:
    path = CATALOGUE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"sweep: got {name!r}; allowed: a sweep file path or a catalogue name: "
                        f"{', '.join(list_catalogue())}")
    return path


def load_spec(path_or_name: str | Path, *, common: dict[str, Any] | None = None,
              seeds: list[int] | None = None) -> SweepSpec:
    """Read a sweep file, or a catalogue sweep by name (`noise`), and validate it (not yet expanded).

    common: dotted config keys merged over the file's `common` (the command line's `--set`, e.g. fewer
    steps for a quick look); seeds: replaces the file's `seeds` and every baseline's own `seeds` (a quick look
    with one seed trains every design once; a baseline's own steps survive, see `common`)."""
    path = Path(path_or_name)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or "/" in str(path_or_name):
            raise SpecError(f"sweep file {str(path)!r} does not exist; catalogue names: "
                            f"{', '.join(list_catalogue())}")
        path = catalogue_path(str(path_or_name))
    try:
        data = yaml.load(path.read_text(), Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict) and common:
        data["common"] = {**_flatten(data.get("common") or {}), **common}
    if isinstance(data, dict) and seeds is not None:
        data["seeds"] = list(seeds)
        for b in data.get("baselines") or []:
            if isinstance(b, dict) and "seeds" in b:
                b["seeds"] = list(seeds)
    return parse_spec(data, str(path))


# ----------------------------------------------------------------------------------------------------------
# Expansion


@dataclasses.dataclass
class Trial:
    """One training run of a sweep, fully resolved and validated.

    `preset` + `overrides` rebuild `config` exactly (`load_run_config(preset, overrides)`), which is the
    form to ship to a remote worker. `depends_on` is the trial_id of the dense baseline this trial is
    upcycled from: the controller runs it first and sets `upcycle.source` to its checkpoint.
    """

    trial_id: str
    sweep: str
    family: str  # "dense" | "moe"
    name: str  # baseline name, or "" for a grid trial
    preset: str
    seed: int
    axes: dict[str, Any]  # axis name -> value (plain axis) or label (linked axis)
    overrides: dict[str, Any]  # resolved dotted keys -> typed values, train.seed included
    config: RunConfig
    depends_on: str | None
    upcycle_from: str | None  # baseline name
    params_total: int
    params_active: int
    params_non_embedding: int
    flops_per_token: float
    steps: int
    tokens: int  # planned training tokens

    @property
    def flops(self) -> float:
        """Planned training FLOPs (flops_per_token x tokens)."""
        return self.flops_per_token * self.tokens

    def row(self) -> dict[str, Any]:
        """The trial's row of the `trials` table, status `pending` (see moelab.platform.store)."""
        out: dict[str, Any] = {
            "sweep": self.sweep, "trial_id": self.trial_id, "family": self.family, "name": self.name,
            "preset": self.preset, "seed": self.seed, "depends_on": self.depends_on,
            "upcycle_from": self.upcycle_from, "status": "pending", "attempt": 0,
            "axis_values": json.dumps(self.axes, sort_keys=True),
            "overrides": json.dumps(self.overrides, sort_keys=True),
            "config": json.dumps(to_dict(self.config), sort_keys=True),
            "params_total": self.params_total, "params_active": self.params_active,
            "params_non_embedding": self.params_non_embedding, "flops_per_token": self.flops_per_token,
            "steps": self.steps, "tokens": self.tokens, "flops": self.flops,
        }
        out.update(flat_config(self.config))
        for axis, value in self.axes.items():
            if axis not in out:  # plain axes already have their config column; linked axes get a label column
                out[axis] = value if axis == "upcycle_from" else str(value)
        return out


def flat_config(rc: RunConfig) -> dict[str, Any]:
    """`{"model.moe.top_k": 2, ...}` with column-stable types: tuples and unions (str | float) as strings."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, (tuple, list)):
                out[key] = json.dumps(list(value))
            elif typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType):
                out[key] = str(value)
            else:
                out[key] = value

    walk(rc, "")
    out.pop("preset", None)
    return out


def _config_field(key: str) -> Any:
    """The annotated type of dotted config key `key`; SpecError naming the allowed keys if it is unknown."""
    tp: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise SpecError(f"{'.'.join(parts[:i])} is a value, not a section")
        names = [f.name for f in dataclasses.fields(tp) if f.name != "preset" or tp is not RunConfig]
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise SpecError(f"got {key!r}; allowed under {where}: {', '.join(names)}")
        tp = typing.get_type_hints(tp)[part]
    if dataclasses.is_dataclass(tp):
        first = dataclasses.fields(tp)[0].name
        raise SpecError(f"got {key!r}, a section; allowed: one of its fields (e.g. {key}.{first})")
    return tp


def _check_keys(where: str, overrides: dict[str, Any], trial_keys: bool) -> None:
    for key in overrides:
        if trial_keys and key in TRIAL_KEYS:
            continue
        if key == "train.seed":
            raise SpecError(f"{where}: {key} is set by `seeds`; allowed: a `seeds` list instead")
        if key == "train.ep":
            raise SpecError(f"{where}: {key} is set by `resources.ep`; allowed: resources.ep instead")
        try:
            _config_field(key)
        except SpecError as e:
            raise SpecError(f"{where}: unknown config key: {e}") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace(".", "p"))


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt(v) for v in value) or "none"
    return str(value)


def _label(axis: str, value: Any, linked: bool) -> str:
    if axis == "upcycle_from":
        return "scratch" if value is None else f"from-{value}"
    if axis == "preset" or linked:
        return f"{axis}{value}" if linked and str(value)[:1].isdigit() else str(value)
    return f"{axis.rsplit('.', 1)[-1]}{_fmt(value)}"


def _resolved(rc: RunConfig, keys: list[str]) -> dict[str, Any]:
    """The validated value at each dotted key (so `1e-3` and "0.001" resolve, and hash, the same)."""
    out = {}
    for key in sorted(keys):
        obj: Any = rc
        for part in key.split("."):
            obj = getattr(obj, part)
        out[key] = list(obj) if isinstance(obj, tuple) else obj
    return out


def _build(spec: SweepSpec, *, name: str, preset: str, overrides: dict[str, Any],
           axes: list[tuple[str, Any, bool]], seed: int, upcycle_from: str | None, depends_on: str | None,
           where: str) -> Trial:
    """One trial; `axes` = (axis name, value or label, linked?) in the order of the file."""
    prefix = name or "grid"
    if preset not in PRESETS:
        raise SpecError(f"{where}: preset: got {preset!r}; allowed: {', '.join(PRESETS)}")
    ov = {**spec.common, **overrides, "train.seed": seed}
    if upcycle_from and "upcycle.seed" not in ov:
        ov["upcycle.seed"] = seed  # a seed also redraws the upcycling noise, reset units and router
    try:
        rc = load_run_config(preset, ov)
    except ConfigError as e:
        ident = " ".join([prefix, *(f"{k}={_fmt(v)}" for k, v, _ in axes), f"seed={seed}"])
        raise SpecError(f"{where}: trial {ident}: {e}") from None
    if rc.model.moe.enabled and spec.resources.ep > 1:
        ep, n, workers = spec.resources.ep, rc.model.moe.n_experts, spec.resources.workers
        if n % ep:
            ok = [d for d in range(1, workers + 1) if n % d == 0 and workers % d == 0]
            raise SpecError(f"resources.ep: got {ep}; allowed: a divisor of model.moe.n_experts={n} (trial "
                            f"{prefix} {' '.join(f'{k}={_fmt(v)}' for k, v, _ in axes)} seed={seed}) and of "
                            f"resources.workers={workers}: {ok}")
        if _HAS_TRAIN_EP:  # the trial's config carries its expert-parallel size
            ov["train.ep"] = ep
            rc = load_run_config(preset, ov)
    resolved = _resolved(rc, list(ov))
    # Plain config axes show the validated value (so "1e-3" and 0.001 label, and hash, alike).
    axes = [(k, resolved[k] if not linked and k in resolved else v, linked) for k, v, linked in axes]
    labels = [_label(k, v, linked) for k, v, linked in axes]
    family = "moe" if rc.model.moe.enabled else "dense"
    digest = hashlib.sha1(json.dumps({"preset": preset, "overrides": resolved, "depends_on": depends_on},
                                     sort_keys=True, default=str).encode()).hexdigest()[:6]
    readable = "-".join([name or family, *labels])[:80]
    trial_id = f"{_slug(readable)}-s{seed}-{digest}"
    pc = rc.model.param_counts()
    # The trials table sizes the model the run produces: MTP modules are a training-time head (DeepSeek-V3
    # reports 671B without its 14B MTP module), so N for the scaling laws leaves them out; the compute they
    # cost stays in flops_per_token (and so in C).
    mtp, mtp_active = pc.get("mtp", 0), pc.get("mtp_active", 0)
    return Trial(trial_id=trial_id, sweep=spec.name, family=family, name=name, preset=preset, seed=seed,
                 axes={k: v for k, v, _ in axes}, overrides=resolved, config=rc, depends_on=depends_on,
                 upcycle_from=upcycle_from, params_total=pc["total"] - mtp, params_active=pc["active"] - mtp_active,
                 params_non_embedding=pc["non_embedding"] - mtp,
                 flops_per_token=rc.model.flops_per_token(rc.train.seq_len), steps=rc.total_steps(),
                 tokens=rc.total_steps() * rc.train.batch_size * rc.train.seq_len)


def _check_upcycle(trial: Trial, source: Trial, where: str) -> None:
    if trial.family != "moe":
        raise SpecError(f"{where}: trial {trial.trial_id}: upcycle_from: got {trial.upcycle_from!r}; allowed: "
                        f"null for a dense trial (model.moe.n_experts is 0; only MoE trials are upcycled)")
    src, dst = source.config.model, trial.config.model
    diff = [f.name for f in dataclasses.fields(src) if f.name != "moe" and getattr(src, f.name) != getattr(dst, f.name)]
    if diff:
        detail = ", ".join(f"model.{k}: {getattr(dst, k)} vs {getattr(src, k)}" for k in diff)
        raise SpecError(f"{where}: trial {trial.trial_id}: upcycle_from: baseline {trial.upcycle_from!r} has a "
                        f"different shape ({detail}); allowed: a baseline with the same model.* except model.moe")
    if src.d_ff % dst.d_expert:
        raise SpecError(f"{where}: trial {trial.trial_id}: model.moe.granularity/d_expert: expert width "
                        f"{dst.d_expert} does not divide the baseline's model.d_ff={src.d_ff}")
    G = src.d_ff // dst.d_expert
    up = trial.config.upcycle
    if up.router_init == "virtual_group" and (dst.moe.n_experts % G or dst.moe.top_k % G):
        raise SpecError(f"{where}: trial {trial.trial_id}: upcycle.router_init: 'virtual_group' needs "
                        f"model.moe.n_experts={dst.moe.n_experts} and top_k={dst.moe.top_k} to be multiples of G={G}")


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, validated: baselines (by seed) first, then the grid (axes x seeds).

    The order is a valid run order (a trial's `depends_on` always comes before it); trial ids are
    deterministic: readable part + seed + a hash of the resolved config overrides.
    """
    _check_keys("common", spec.common, trial_keys=False)
    if spec.axes and spec.base is None:
        raise SpecError("axes: a grid needs `base` (preset + overrides to vary); allowed: add base, or remove axes")
    if spec.base is None and not spec.baselines:
        raise SpecError("base: a sweep needs `base` (a grid) or `baselines` (dense trials); neither is given")

    # Baselines.
    trials: list[Trial] = []
    by_baseline: dict[str, dict[int, Trial]] = {}
    for i, b in enumerate(spec.baselines):
        where = f"baselines[{i}]"
        if not NAME_RE.match(b.key):
            raise SpecError(f"{where}.name: got {b.key!r}; allowed: letters, digits, '_' and '-'")
        if b.key in by_baseline:
            raise SpecError(f"{where}.name: got {b.key!r} twice; allowed: distinct names (set `name`)")
        _check_keys(f"{where}.overrides", b.overrides, trial_keys=False)
        by_baseline[b.key] = {}
        for seed in b.seeds or spec.seeds:
            t = _build(spec, name=b.key, preset=b.preset, overrides=b.overrides, axes=[], seed=seed,
                       upcycle_from=None, depends_on=None, where=where)
            if t.family != "dense":
                raise SpecError(f"{where}: model.moe.n_experts: got {t.config.model.moe.n_experts}; allowed: 0 "
                                f"(baselines are dense; put MoE trials in base/axes)")
            by_baseline[b.key][seed] = t
            trials.append(t)

    # The grid.
    if spec.base is not None:
        base = spec.base
        _check_keys("base.overrides", base.overrides, trial_keys=False)
        names, choices = [], []
        set_by: dict[str, str] = {}
        for axis, values in spec.axes.items():
            linked = isinstance(values, dict)
            if linked:
                if axis in RESERVED_COLUMNS:
                    raise SpecError(f"axes.{axis}: a linked axis name must not be a trials column "
                                    f"({', '.join(sorted(RESERVED_COLUMNS))})")
                opts = [(lab, moves) for lab, moves in values.items()]
                keys = {k for _, moves in opts for k in moves}
                for lab, moves in opts:
                    _check_keys(f"axes.{axis}.{lab}", moves, trial_keys=True)
            else:
                if axis not in TRIAL_KEYS:
                    _check_keys("axes", {axis: None}, trial_keys=False)
                opts = [(v, {axis: v}) for v in values]
                keys = {axis}
            for k in keys:
                if k in set_by:
                    raise SpecError(f"axes.{axis}: {k} is also set by axis {set_by[k]!r}; allowed: each key in "
                                    f"one axis (use a linked axis to move keys together)")
                set_by[k] = axis
            names.append((axis, linked))
            choices.append(opts)

        for combo in itertools.product(*choices) if choices else [()]:
            moves: dict[str, Any] = {}
            axes_vals = []
            for (axis, linked), (value, mv) in zip(names, combo):
                moves.update(mv)
                axes_vals.append((axis, value, linked))
            preset = moves.pop("preset", base.preset)
            up = moves.pop("upcycle_from", base.upcycle_from)
            if up is not None and (not isinstance(up, str) or up not in by_baseline):
                allowed = ", ".join(by_baseline) or "none (the sweep has no baselines)"
                raise SpecError(f"upcycle_from: got {up!r}; allowed: a baseline name ({allowed}) or null")
            where = "axes" if spec.axes else "base"
            for seed in spec.seeds:
                src = None
                if up is not None:
                    seeds_of = by_baseline[up]
                    src = seeds_of.get(seed) or next(iter(seeds_of.values()))
                t = _build(spec, name="", preset=preset, overrides={**base.overrides, **moves}, axes=axes_vals,
                           seed=seed, upcycle_from=up, depends_on=src.trial_id if src else None,
                           where=where)
                if src is not None:
                    _check_upcycle(t, src, where)
                trials.append(t)

    # Cross-trial checks.
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.trial_id in seen:
            raise SpecError(f"axes: trials {seen[t.trial_id].axes} and {t.axes} resolve to the same config "
                            f"({t.trial_id}); allowed: distinct axis values")
        seen[t.trial_id] = t
    return trials


# ----------------------------------------------------------------------------------------------------------
# Dry run


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_trials(trials: list[Trial]) -> str:
    """The trial table `moelab sweep FILE --dry-run` prints: one line per trial, then totals."""
    header = ["trial_id", "family", "seed", "axes", "params", "active", "FLOPs/tok", "tokens", "FLOPs",
              "depends_on"]
    rows = []
    for t in trials:
        axes = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in t.axes.items()) or "-"
        rows.append([t.trial_id, t.family, str(t.seed), axes, _si(t.params_total), _si(t.params_active),
                     _si(t.flops_per_token), _si(t.tokens), _si(t.flops), t.depends_on or "-"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 4, 5, 6, 7, 8}

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    n_dense = sum(t.family == "dense" for t in trials)
    out.append(f"{len(trials)} trials ({n_dense} dense, {len(trials) - n_dense} moe), "
               f"{_si(sum(t.flops for t in trials))} training FLOPs in all")
    return "\n".join(out)
