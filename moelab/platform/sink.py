"""Tune callbacks that take trial results as they arrive in the sweep's driver.

`StoreSink` writes the results store (`moelab.platform.store`): the `trials` row of each trial (status
pending -> running -> finished / failed / diverged, attempt, final metrics, error text, final checkpoint),
its logged steps (`metrics`), expert loads (`experts`) and, when the data has domains, routed tokens per
domain and expert (`routing`). Rows are buffered by the Store and written in batches; a trial's buffer is
also flushed whenever a result carries a checkpoint, so everything up to the newest checkpoint that Ray
Train can resume from is on storage.

Attempts. Each trial's rows are written under an `attempt` number that the sink keeps: it starts at the
controller's `start_attempt` (0 for a new trial, the stored attempt + 1 for one resumed after a crashed
controller) and goes up by one whenever a result's step is not past the last step already seen (a worker
restarted by Ray Train, or a retry by Tune, resumed from an older checkpoint and logs those steps again).
Readers keep, per (trial_id, step), the row of the highest attempt, so a rerun step replaces the old one.

`WandbSink` logs the same results to Weights & Biases (one W&B run per trial, grouped by sweep), offline
unless W&B is configured (WANDB_MODE, WANDB_API_KEY or a `wandb login`).

Both read the special rows of the Ray Train worker (`moelab.platform.worker`): `{"diverged": 1, "error":
...}` ends a diverged run; `{"backfill": [rows], "restored_from": checkpoint}` re-sends the rows logged just
before the checkpoint a restarted run resumed from; any row may carry `{"earlier": [rows]}`, the logged rows
the worker batched before it (stored before it, in order).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from moelab.platform.store import METRIC_COLUMNS, Store
from moelab.platform.worker import BACKFILL_KEY, CHECKPOINT_PATH_KEY, DIVERGED_KEY, EARLIER_KEY

__all__ = ["StoreSink", "WandbSink", "WandbUnavailable", "require_wandb", "wandb_mode", "CHECKPOINT_KEY", "trial_id_of", "error_text"]

CHECKPOINT_KEY = CHECKPOINT_PATH_KEY  # a persisted checkpoint: added by Tune's Ray Train callback, or the trial itself
_ROW_KEYS = (*METRIC_COLUMNS, "expert_load", "expert_domain")
ERROR_CHARS = 4000  # the tail of a traceback kept in trials.error


def trial_id_of(trial: Any) -> str:
    """The moelab trial id of a Tune trial (its config carries it)."""
    return trial.config["trial_id"]


def error_text(trial: Any) -> str:
    """The tail of the trial's error trace: the exception lines are at the end."""
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - storage hiccup: say what we can
        text = ""
    text = str(text).strip() or "the trial failed without an error trace (see the Ray logs)"
    return text if len(text) <= ERROR_CHARS else "..." + text[-ERROR_CHARS:]


def _unavailable(name: str) -> None:
    """Tune pickles its callbacks into the experiment state (for Tuner.restore, which the sweep controller
    does not use: it resumes from the store). A sink lives only in its driver, so it pickles to None."""
    return None


def _metric_row(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in _ROW_KEYS if k in result}


@dataclass
class _TrialState:
    attempt: int
    last_step: int = -1
    last_row: dict[str, Any] = field(default_factory=dict)
    last_eval: float | None = None
    checkpoint: str | None = None
    diverged: dict[str, Any] | None = None


class StoreSink(Callback):
    """Trial results -> the results store.

    store: the Store of the sweep's root; sweep: its name; steps: trial_id -> planned steps (a trial is
    `finished` when its last logged step reaches them); start_attempt: trial_id -> first attempt number;
    on_done(trial_id, row): called with the final trial row (the controller's progress line and the
    dependency bookkeeping hang here); compact: merge an ended trial's batch files into one; ready(trial_id):
    returns once the trial's `pending` row is on storage (the controller writes those while trials start).
    """

    def __init__(self, store: Store, sweep: str, steps: Mapping[str, int], *,
                 start_attempt: Mapping[str, int] | None = None,
                 on_done: Callable[[str, dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] | None = None, compact: bool = True,
                 ready: Callable[[str], None] | None = None):
        self.store, self.sweep, self.steps = store, sweep, dict(steps)
        self.compact = compact
        self.start_attempt = dict(start_attempt or {})
        self.on_done, self.log = on_done, log or (lambda msg: None)
        self.ready = ready or (lambda tid: None)
        self.state: dict[str, _TrialState] = {}

    # -- helpers --------------------------------------------------------------------------------------------------
    def _state(self, tid: str) -> _TrialState:
        if tid not in self.state:
            self.state[tid] = _TrialState(attempt=self.start_attempt.get(tid, 0))
        return self.state[tid]

    def _rows(self, tid: str, st: _TrialState, rows: list[dict[str, Any]]) -> None:
        rows = [r for r in rows if r.get("step") is not None]
        if not rows:
            return
        first = min(int(r["step"]) for r in rows)
        if first <= st.last_step:  # a restarted run logs these steps again: a new attempt replaces them
            st.attempt += 1
        self.store.append_metrics(self.sweep, tid, st.attempt, [_metric_row(r) for r in rows])
        for r in rows:
            if r.get("eval_loss") is not None:
                st.last_eval = r["eval_loss"]
        last = max(rows, key=lambda r: r["step"])
        st.last_step, st.last_row = int(last["step"]), _metric_row(last)

    def _final_fields(self, st: _TrialState) -> dict[str, Any]:
        r = st.last_row
        return {"attempt": st.attempt, "final_step": r.get("step"), "final_tokens": r.get("tokens"),
                "final_flops": r.get("flops"), "final_loss": r.get("loss"), "final_eval_loss": st.last_eval,
                "wall_s": r.get("wall_s")}

    def _compact(self, tid: str) -> None:
        """One metrics (and experts) file per ended trial instead of one per checkpoint: reads are per file."""
        if self.compact:
            self.store.compact(self.sweep, tid)

    def _finish(self, tid: str, fields: dict[str, Any]) -> None:
        row = self.store.update_trial(self.sweep, tid, **fields)
        if self.on_done:
            self.on_done(tid, row)

    # -- Tune callback ----------------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial_id_of(trial)
        st = self._state(tid)
        self.ready(tid)  # else the pending row, written late, would overwrite this one
        source = trial.config.get("upcycle_checkpoint") or ""
        self.store.update_trial(self.sweep, tid, status="running", attempt=st.attempt, error=None,
                                **({"upcycle.source": source} if source else {}))
        self.log(f"{tid}: running" + (f" (upcycled from {trial.config.get('depends_on')})" if source else ""))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial_id_of(trial)
        st = self._state(tid)
        if BACKFILL_KEY in result:
            if result.get("restored_from"):
                st.checkpoint = result["restored_from"]
            self._rows(tid, st, list(result[BACKFILL_KEY] or []))
            self.log(f"{tid}: resumed from {result.get('restored_from')}")
            return
        if result.get(DIVERGED_KEY):
            st.diverged = {"step": result.get("step"), "error": result.get("error") or "diverged"}
            return
        if result.get("step") is None:
            return
        self._rows(tid, st, [*(result.get(EARLIER_KEY) or []), result])
        if result.get(CHECKPOINT_KEY):
            st.checkpoint = result[CHECKPOINT_KEY]
            self.store.flush(self.sweep, tid)  # durable up to the checkpoint Ray Train would resume from

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial_id_of(trial)
        self.store.flush(self.sweep, tid)
        self.log(f"{tid}: failed, retrying from its last checkpoint: {error_text(trial).splitlines()[-1]}")

    def _ended(self, trial: Any) -> tuple[str, _TrialState, dict[str, Any]]:
        """A trial ended (either way): its rows made durable and compacted; (trial_id, state, final fields)."""
        tid = trial_id_of(trial)
        st = self._state(tid)
        self.store.flush(self.sweep, tid)
        self._compact(tid)
        return tid, st, self._final_fields(st)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid, st, fields = self._ended(trial)
        if st.diverged is not None:
            fields.update(status="diverged", error=st.diverged["error"])
            self.log(f"{tid}: diverged: {st.diverged['error']}")
        elif st.last_step >= self.steps.get(tid, 0):
            fields.update(status="finished", error=None, checkpoint=st.checkpoint)
            loss = fields.get("final_loss")
            self.log(f"{tid}: finished, loss {loss:.4f}" if isinstance(loss, float) else f"{tid}: finished")
        else:
            fields.update(status="failed", error=f"the run ended at step {st.last_step} of "
                                                 f"{self.steps.get(tid)} without an error")
            self.log(f"{tid}: failed: {fields['error']}")
        self._finish(tid, fields)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid, _, fields = self._ended(trial)
        fields.update(status="failed", error=error_text(trial))
        self.log(f"{tid}: failed: {fields['error'].splitlines()[-1]}")
        self._finish(tid, fields)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.store.flush(self.sweep)

    def __reduce__(self):
        return (_unavailable, ("StoreSink",))


# ----------------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbUnavailable(RuntimeError):
    """--wandb without the wandb package."""


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set; else online when an API key is configured, offline otherwise."""
    return os.environ.get("WANDB_MODE") or ("online" if _wandb_configured() else "offline")


def require_wandb() -> Any:
    """The wandb module; WandbUnavailable (naming the install command) when the package is missing."""
    try:
        import wandb
    except ImportError:
        raise WandbUnavailable("--wandb needs the wandb package: pip install 'moelab[wandb]'") from None
    return wandb


class WandbSink(Callback):
    """One W&B run per trial (name and id = the trial id, group = the sweep, config = the trials row)."""

    def __init__(self, sweep: str, rows: Mapping[str, Mapping[str, Any]], *, project: str | None = None,
                 mode: str | None = None):
        self.wandb = require_wandb()
        self.sweep, self.rows = sweep, {k: dict(v) for k, v in rows.items()}
        self.project = project or os.environ.get("WANDB_PROJECT") or "moelab"
        self.mode = mode or wandb_mode()
        self.runs: dict[str, Any] = {}
        self.last_step: dict[str, int] = {}
        self.diverged: set[str] = set()

    def _run(self, tid: str) -> Any:
        run = self.runs.get(tid)
        if run is None:
            config = {k: v for k, v in self.rows.get(tid, {}).items()
                      if not isinstance(v, float) or math.isfinite(v)}
            run = self.wandb.init(project=self.project, group=self.sweep, name=tid, id=f"{self.sweep}-{tid}",
                                  resume="allow", config=config, mode=self.mode, reinit="create_new",
                                  settings=self.wandb.Settings(silent=True, console="off"))
            self.runs[tid] = run
        return run

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial_id_of(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = trial_id_of(trial)
        if result.get(DIVERGED_KEY):
            self.diverged.add(tid)
            return
        if BACKFILL_KEY in result or result.get("step") is None:
            return
        for row in [*(result.get(EARLIER_KEY) or []), result]:
            step = int(row["step"])
            if step <= self.last_step.get(tid, -1):  # W&B steps only go forward; a rerun step was logged already
                continue
            self.last_step[tid] = step
            data = {k: row[k] for k in METRIC_COLUMNS if k != "step" and row.get(k) is not None}
            for layer, load in enumerate(row.get("expert_load") or []):
                data[f"imbalance/layer{layer}"] = max(load) * len(load) if load else 0.0
            self._run(tid).log(data, step=step)

    def _end(self, trial: Any, status: str, exit_code: int) -> None:
        run = self.runs.pop(trial_id_of(trial), None)
        if run is not None:
            run.summary["status"] = status
            run.finish(exit_code=exit_code)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "diverged" if trial_id_of(trial) in self.diverged else "finished", 0)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "failed", 1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for run in list(self.runs.values()):
            run.finish()
        self.runs.clear()

    def __reduce__(self):
        return (_unavailable, ("WandbSink",))
