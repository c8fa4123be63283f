"""Every value a request brings to the dashboard is checked here, before anything reads the store.

A Dash page is a server: a POST to `/_dash-update-component` can carry any value for any control, whatever
the dropdowns offered, and a URL can say anything. So every request meets, in this order:

* the request itself (`guard_requests`): the Host header must name a loopback host or one the user allowed
  (DNS rebinding), and the body is bounded (`MAX_REQUEST_BYTES`);
* the URL (`parse_state`, `check_state`): each parameter parsed leniently, then checked against what the
  store holds (`Offer`); a value that is not allowed falls back to its default, never to an error;
* the callback (`checked`): the sweep and trial names that become store paths must be valid names, and the
  sweep one this store lists, else `RefusedInput` and nothing is read; the metric, x axis, axis and split
  names a view uses are checked by `check_metric`, `check_x`, `check_axis`, ... (the frames call these too),
  and the Scaling view's compute budget by `check_budget`;
* what a page prints (`shown_uri`): the store's URI without credentials.

The names a request may use (views, metrics, x axes, the "all but seed" grouping) are defined here too.
Nothing in this module reads the store itself: `checked` asks the reader it is given for its sweeps, and
`check_state` is given the `Offer` the frames computed.
"""

from __future__ import annotations

import logging
import math
import os
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from moelab.platform.store import METRIC_COLUMNS, STATUSES, StoreError, check_name, redact_uri

if TYPE_CHECKING:
    from flask import Flask

    from moelab.dashboards.reader import Reader

__all__ = [
    "VIEWS", "X_AXES", "METRICS", "FINAL_METRICS", "ALL_BUT_SEED", "GROUP_SEEDS", "LOOPBACK_HOSTS",
    "MAX_REQUEST_BYTES", "RefusedInput", "checked", "check_metric", "check_x", "check_metric_columns",
    "check_axis", "check_split", "check_trial_column", "shown_uri", "host_name", "guard_requests", "parse_state",
    "encode_state", "controls_state", "group_control", "without_store", "check_sweep", "Offer", "Checked",
    "check_state", "MAX_BUDGET", "check_budget",
]

log = logging.getLogger("moelab.dashboards")

# ----------------------------------------------------------------------------------------------------------
# The names a request may use

VIEWS = {"overview": "Sweeps", "runs": "Runs", "curves": "Curves", "effects": "Axis effects",
         "scaling": "Scaling & leverage", "experts": "Experts", "parallel": "Parallel coordinates"}
X_AXES = ("step", "tokens", "flops", "wall_s")
METRICS = tuple(k for k in METRIC_COLUMNS if k not in X_AXES)
FINAL_METRICS = ("final_loss", "final_eval_loss", "leverage")
ALL_BUT_SEED = "(all but seed)"  # the group dropdown's value for "trials that differ only in seed"
GROUP_SEEDS = "seeds"  # the URL's token for ALL_BUT_SEED
# Host headers served without --allow-host. A page on another site can point its own name at 127.0.0.1
# (DNS rebinding) and read a loopback server; its requests then carry that name, and are refused.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# A callback request carries control values only (the tables travel in responses): a larger body is not ours.
MAX_REQUEST_BYTES = 1 << 20
# A view that has not answered in this time gets a message instead (its work finishes in the background):
# one slow or hostile store path must not hold the page, or a request thread, without bound.
REQUEST_TIMEOUT_S = 30.0
# The largest compute budget the EL surface accepts (FLOPs): far beyond any training run, and small enough
# that log10 C and the law's power stay ordinary floats.
MAX_BUDGET = 1e40
# URL keys whose allowed values depend on the store: cleared when there is no store to check them against.
_STORE_KEYS = ("sweep", "axis", "baseline", "split", "color", "trial", "family")


# ----------------------------------------------------------------------------------------------------------
# Names that reach the store, and names a view computes with


class RefusedInput(ValueError):
    """A callback input that must not reach the store; the view shows the message, nothing is read."""


def checked(reader: Reader, *, sweep: Any = None, trial: Any = None) -> None:
    """The one check every callback runs on the values that become store paths. A POST to
    /_dash-update-component can carry any value, whatever the dropdowns offered: a sweep must be a valid
    name and one this store lists, a trial a valid name (the reader looks it up within the sweep)."""
    try:
        if sweep is not None:
            check_name("sweep", sweep)
        if trial is not None:
            check_name("trial", trial)
    except StoreError as e:
        log.warning("dashboard: refused a request: %s", e)
        raise RefusedInput(f"Refused: {e}") from None
    if sweep is not None and sweep not in reader.sweeps():
        raise RefusedInput(f"Refused: sweep: got {sweep!r}; allowed: a sweep of this store")


def check_metric(metric: Any) -> None:
    """A metric a curve can show (a `metrics` table column that is not an x axis); KeyError otherwise."""
    if metric not in METRICS:
        raise KeyError(f"metric: got {metric!r}; allowed: {', '.join(METRICS)}")


def check_x(x: Any) -> None:
    """An x axis a curve can use; KeyError otherwise."""
    if x not in X_AXES:
        raise KeyError(f"x: got {x!r}; allowed: {', '.join(X_AXES)}")


def check_metric_columns(columns: Iterable[Any]) -> None:
    """Columns of the `metrics` table; KeyError naming the others."""
    bad = [c for c in columns if c not in METRIC_COLUMNS]
    if bad:
        raise KeyError(f"unknown metric column(s) {bad}; allowed: {list(METRIC_COLUMNS)}")


def check_trial_column(metric: Any, trials: pd.DataFrame) -> None:
    """A per-trial result the effects can average (a column of `trials`); ValueError otherwise."""
    if metric not in trials:
        raise ValueError(f"metric {metric!r} is not a trial column here")


def check_axis(axis: Any, axes: Sequence[str]) -> None:
    """One of the sweep's axes; ValueError naming them otherwise."""
    if axis not in axes:
        raise ValueError(f"{axis!r} is not an axis of these trials (axes: {list(axes)})")


def check_split(split: Any, axis: Any, axes: Sequence[str]) -> None:
    """Another axis than `axis` to split the effects by; ValueError otherwise."""
    if split not in axes or split == axis:
        raise ValueError(f"split {split!r} must be another axis (axes: {list(axes)})")


def check_budget(budget: Any) -> float | None:
    """The EL surface's compute budget in FLOPs: None (or an empty field) for the law's default, else a
    number (not a bool, not text) that is finite, positive and at most MAX_BUDGET; ValueError otherwise."""
    if budget is None or budget == "":
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= MAX_BUDGET:
        raise ValueError(f"budget: got {budget!r}; allowed: training FLOPs, a number in (0, {MAX_BUDGET:g}], "
                         f"or empty for the default")
    return float(budget)


def _budget(value: Any) -> float | None:
    """`check_budget` for the URL and the sync callback: text is parsed, anything not allowed is the default."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    try:
        return check_budget(value)
    except ValueError:
        return None


def shown_uri(root: str | os.PathLike) -> str:
    """The store's URI as pages, messages and the log show it: never its credentials."""
    return redact_uri(root)


# ----------------------------------------------------------------------------------------------------------
# The request: Host header and size


def host_name(header: str) -> str:
    """The host part of a Host header (`name:port`, `[::1]:port`), lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def guard_requests(server: Flask, allowed_hosts: Iterable[str] = ()) -> None:
    """Make `server` answer 403 to a Host header that names neither a loopback name nor one of
    `allowed_hosts` ("*": any), and 413 to a body over MAX_REQUEST_BYTES."""
    hosts = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
    server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    @server.before_request
    def _only_our_hosts():
        from flask import request

        name = host_name(request.headers.get("Host", ""))
        if "*" in hosts or name in hosts:
            return None
        log.warning("dashboard: refused a request for Host %r (allowed: %s)", name, ", ".join(sorted(hosts)))
        return (f"This dashboard does not serve the host name {name!r}. If you reach it under that name on "
                f"purpose, restart it with --allow-host {name or 'NAME'}.\n", 403, {"Content-Type": "text/plain"})


# ----------------------------------------------------------------------------------------------------------
# URL state: parsed leniently, written back without defaults


def _first(params: dict[str, list[str]], key: str) -> str | None:
    v = params.get(key)
    return v[0] if v else None


def _list(params: dict[str, list[str]], key: str) -> list[str] | None:
    v = _first(params, key)
    return None if v is None else [s for s in v.split(",") if s]


def _float(text: str | None, default: float, lo: float, hi: float) -> float:
    try:
        v = float(text) if text is not None else default
    except ValueError:
        return default
    return min(max(v, lo), hi) if math.isfinite(v) else default


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except (ValueError, OverflowError):
        return None


def parse_state(search: str | None) -> dict[str, Any]:
    """The raw state in a URL query string. Unknown keys are ignored; values are checked later against
    what the store holds (`check_state`)."""
    params = urllib.parse.parse_qs((search or "").lstrip("?"), keep_blank_values=True, max_num_fields=100)
    group = _list(params, "group")
    return {
        "view": _first(params, "view"), "sweep": _first(params, "sweep"), "status": _list(params, "status"),
        "family": _list(params, "family"), "metric": _first(params, "metric"), "x": _first(params, "x"),
        "log": _list(params, "log") or [], "smooth": _float(_first(params, "smooth"), 0.0, 0.0, 0.99),
        "group": None if group is None else ([] if group == ["none"] else group),
        "axis": _first(params, "axis"), "baseline": _first(params, "baseline"), "split": _first(params, "split"),
        "emetric": _first(params, "emetric"), "color": _first(params, "color"), "trial": _first(params, "trial"),
        "step": _int(_first(params, "step")), "layer": _int(_first(params, "layer")),
        "pmetric": _first(params, "pmetric"), "budget": _budget(_first(params, "budget")),
        "differ": _first(params, "differ") != "0", "refresh": _first(params, "refresh") != "0",
    }


def encode_state(state: dict[str, Any]) -> str:
    """The query string of a normalised state (defaults left out, lists comma-joined). `state["_defaults"]`
    (set by `check_state`) holds the store-dependent defaults (first axis, all families, ...)."""
    dflt = state.get("_defaults", {})
    out: dict[str, str] = {"view": state["view"]}
    if state.get("sweep"):
        out["sweep"] = state["sweep"]
    for key in ("status", "family"):
        v = state.get(key)
        if v is not None and (key not in dflt or set(v) != set(dflt[key])):
            out[key] = ",".join(v) or "none"
    defaults = {"metric": "loss", "x": "step", "emetric": "final_loss", "pmetric": "final_loss"}
    for key in ("metric", "x", "axis", "baseline", "split", "emetric", "color", "trial", "pmetric"):
        v = state.get(key)
        if v not in (None, "") and v != defaults.get(key) and v != dflt.get(key):
            out[key] = str(v)
    if state.get("log"):
        out["log"] = ",".join(state["log"])
    if state.get("smooth"):
        out["smooth"] = f"{state['smooth']:g}"
    g = state.get("group")
    if g is not None and g != [GROUP_SEEDS]:
        out["group"] = ",".join(g) or "none"
    budget = _budget(state.get("budget"))
    if budget is not None:
        out["budget"] = f"{budget:.6g}"
    for key in ("step", "layer"):
        if state.get(key) is not None and state[key] != dflt.get(key, 0 if key == "layer" else None):
            out[key] = str(int(state[key]))
    if not state.get("differ", True):
        out["differ"] = "0"
    if not state.get("refresh", True):
        out["refresh"] = "0"
    return "?" + urllib.parse.urlencode(out, safe=",")


def controls_state(values: dict[str, Any]) -> dict[str, Any]:
    """The state the controls' values (URL key -> value) stand for: checkboxes as booleans, the group
    dropdown's ALL_BUT_SEED as the URL's GROUP_SEEDS."""
    s = dict(values)
    s["log"] = s.get("log") or []
    s["differ"] = bool(s.get("differ"))
    s["refresh"] = bool(s.get("refresh"))
    s["smooth"] = float(s["smooth"] or 0.0)
    if s.get("group") is not None:
        s["group"] = [GROUP_SEEDS if g == ALL_BUT_SEED else g for g in s["group"]]
    return s


def group_control(group: list[str] | None) -> list[str]:
    """The group dropdown's value for the state's `group` (the inverse of `controls_state`'s mapping)."""
    return [ALL_BUT_SEED if g == GROUP_SEEDS else g for g in (group or [])]


# ----------------------------------------------------------------------------------------------------------
# URL state against the store


def _check_view(state: dict[str, Any]) -> dict[str, Any]:
    s = dict(state)
    if s.get("view") not in VIEWS:
        s["view"] = "overview"
    return s


def without_store(state: dict[str, Any]) -> dict[str, Any]:
    """`state` when there is no store to check it against (missing, or no sweeps yet): the view checked,
    the values that need the store cleared."""
    s = _check_view(state)
    for k in _STORE_KEYS:
        s[k] = None
    s["budget"] = _budget(s.get("budget"))
    return s


def check_sweep(sweep: Any, sweeps: Sequence[str], latest: str | None) -> str:
    """`sweep` when the store lists it, else the sweep written last (`latest`), else the first one."""
    if sweep in sweeps:
        return sweep
    return latest if latest in sweeps else sweeps[0]


@dataclass
class Offer:
    """What one sweep offers the controls, as the frames read it: its trial rows, the columns worth
    grouping by, its axes and, per axis, its values as text (what the baseline dropdown offers)."""

    trials: pd.DataFrame
    group_keys: list[str]
    axes: list[str]
    axis_values: dict[str, list[str]]


@dataclass
class Checked:
    """A URL state checked against one sweep (`state`, with `state["_defaults"]`) and what each control
    may offer: families, group keys, axes, split axes, baseline values, colour keys, MoE trials as
    (trial_id, status), and the chosen trial's last step (None: unknown)."""

    state: dict[str, Any]
    families: list[str]
    group_keys: list[str]
    axes: list[str]
    split_axes: list[str]
    baselines: list[str]
    colors: list[str]
    trials: list[tuple[str, str]]
    last_step: int | None


def check_state(state: dict[str, Any], sweep: str, offer: Offer) -> Checked:
    """Check `state` against `sweep` (checked already, `check_sweep`) and what it offers: every value the
    sweep does not have becomes its default."""
    s = _check_view(state)
    s["sweep"] = sweep
    t = offer.trials
    dflt = s["_defaults"] = {"status": list(STATUSES)}
    s["status"] = list(STATUSES) if s.get("status") is None else [x for x in s["status"] if x in STATUSES]
    fams = sorted(t["family"].dropna().unique().tolist()) if "family" in t else []
    s["family"] = fams if s.get("family") is None else [f for f in s["family"] if f in fams]
    dflt["family"] = fams
    if s.get("metric") not in METRICS:
        s["metric"] = "loss"
    if s.get("x") not in X_AXES:
        s["x"] = "step"
    s["log"] = [v for v in s.get("log") or [] if v in ("x", "y")]
    keys = offer.group_keys
    g = s.get("group")
    if g is None:
        g = [GROUP_SEEDS]
    g = [x for x in g if x == GROUP_SEEDS or x in keys]
    s["group"] = [GROUP_SEEDS] if GROUP_SEEDS in g else g
    axes = offer.axes
    dflt["axis"] = axes[0] if axes else None
    if s.get("axis") not in axes:
        s["axis"] = dflt["axis"]
    if s.get("split") not in axes or s.get("split") == s.get("axis"):
        s["split"] = None
    values = offer.axis_values.get(s["axis"], []) if s["axis"] else []
    dflt["baseline"] = values[0] if values else None
    if s.get("baseline") not in values:
        s["baseline"] = dflt["baseline"]
    for key in ("emetric", "pmetric"):
        if s.get(key) not in FINAL_METRICS:
            s[key] = "final_loss"
    dflt["color"] = axes[0] if axes else None
    if s.get("color") not in axes + ["family", "name"]:
        s["color"] = dflt["color"]
    moe = t[t["family"] == "moe"] if "family" in t else t.iloc[0:0]
    done = moe[moe["status"] == "finished"]
    dflt["trial"] = (done if len(done) else moe)["trial_id"].iloc[0] if len(moe) else None
    if s.get("trial") not in set(moe["trial_id"]):
        s["trial"] = dflt["trial"]
    last = None
    if s["trial"] is not None:
        row = t[t["trial_id"] == s["trial"]].iloc[0]
        for c in ("final_step", "train.steps", "steps"):
            if c in row and pd.notna(row[c]):
                last = int(row[c])
                break
    dflt["step"] = last
    if last is not None:  # the slider shows the last step unless the URL names another
        s["step"] = last if s.get("step") is None else int(min(max(int(s["step"]), 0), last))
    if s.get("layer") is None or s["layer"] < 0:
        s["layer"] = 0
    s["budget"] = _budget(s.get("budget"))
    return Checked(s, fams, keys, axes, [a for a in axes if a != s["axis"]], values,
                   axes + [k for k in ("family", "name") if k in t],
                   [(r.trial_id, r.status) for r in moe.itertuples()], last)
