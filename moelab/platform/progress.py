"""The progress of a running sweep: one `SweepProgress` (trials done / running / pending, tokens per second,
ETA), kept up to date by a Tune callback (`make_progress`) from the trials' events and reports.

`moelab sweep` draws it as one live line (`moelab.cli.LiveLine`); `run_sweep(progress=...)` receives it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SweepProgress", "make_progress"]


def _unavailable(name: str) -> None:
    """What a pickled driver-only callback unpickles to: nothing."""
    return None


@dataclass
class SweepProgress:
    """A sweep's state for its live progress line (`moelab sweep` redraws it; `--verbose` adds per-trial lines)."""

    sweep: str
    total: int  # trials of the sweep, those a resume skipped included
    finished: int
    diverged: int
    failed: int
    running: int
    pending: int
    tokens_per_s: float  # training rate summed over the running trials (their latest reports)
    eta_s: float | None  # None until some tokens were trained
    elapsed_s: float

    @property
    def done(self) -> int:
        return self.finished + self.diverged + self.failed

    def line(self) -> str:
        ended = f"{self.done}/{self.total} done"
        outcomes = [f"{n} {what}" for n, what in ((self.diverged, "diverged"), (self.failed, "failed")) if n]
        if outcomes:
            ended += f" ({', '.join(outcomes)})"
        eta = "-" if self.eta_s is None else _duration(self.eta_s)
        return (f"sweep {self.sweep}: {ended}, {self.running} running, {self.pending} pending | "
                f"{_si(self.tokens_per_s)} tok/s | ETA {eta} | {_duration(self.elapsed_s)} elapsed")


def _duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def make_progress(sweep: str, planned: dict[str, int], status: dict[str, str], total: int,
                   emit: Callable[[SweepProgress], None], interval_s: float = 1.0):
    """A Tune callback that calls `emit` with the sweep's progress: at every trial start and end, and at most
    every `interval_s` in between. planned: trial_id -> tokens, for the trials this call runs."""
    from ray.tune import Callback

    from moelab.platform.sink import trial_id_of
    from moelab.platform.worker import BACKFILL_KEY

    class ProgressLine(Callback):
        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.first_start: float | None = None
            self.last_emit = -math.inf
            self.running: set[str] = set()
            self.tokens: dict[str, float] = {}  # latest tokens per trial
            self.base: dict[str, float] = {}  # its tokens when this call took it up (a resumed trial: > 0)
            self.rate: dict[str, float] = {}  # tokens/s per running trial

        def snapshot(self) -> SweepProgress:
            now = time.monotonic()
            count = lambda what: sum(1 for v in status.values() if v == what)  # noqa: E731
            finished, diverged, failed = count("finished"), count("diverged"), count("failed")
            running = len(self.running)
            left = sum(max(n - self.tokens.get(t, 0), 0) for t, n in planned.items() if status.get(t) not in
                       ("finished", "diverged", "failed"))
            gained = sum(self.tokens[t] - self.base.get(t, 0) for t in self.tokens)
            # The sweep's own rate (start-up and waits included), not the trials' training rate: what the
            # remaining tokens will take at the pace so far.
            eta = (left / (gained / (now - self.first_start)) if gained > 0 and self.first_start is not None
                   and now > self.first_start else None)
            return SweepProgress(sweep=sweep, total=total, finished=finished, diverged=diverged, failed=failed,
                                 running=running, pending=max(total - finished - diverged - failed - running, 0),
                                 tokens_per_s=sum(self.rate.values()), eta_s=eta, elapsed_s=now - self.t0)

        def _emit(self, force: bool) -> None:
            now = time.monotonic()
            if force or now - self.last_emit >= interval_s:
                self.last_emit = now
                emit(self.snapshot())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.running.add(trial_id_of(trial))
            if self.first_start is None:
                self.first_start = time.monotonic()
            self._emit(True)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            tid = trial_id_of(trial)
            if BACKFILL_KEY in result:  # resumed from a checkpoint: tokens up to it were trained before
                rows = result[BACKFILL_KEY] or []
                if rows and rows[-1].get("tokens") is not None:
                    self.tokens[tid] = self.base[tid] = rows[-1]["tokens"]
            elif result.get("tokens") is not None:
                self.tokens[tid] = result["tokens"]
                self.base.setdefault(tid, 0)
                self.rate[tid] = float(result.get("tokens_per_s") or 0.0)
            self._emit(False)

        def _ended(self, trial: Any) -> None:
            tid = trial_id_of(trial)
            self.running.discard(tid)
            self.rate.pop(tid, None)
            self._emit(True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trial)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.rate.pop(trial_id_of(trial), None)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            self._emit(False)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self._emit(True)

        def __reduce__(self):
            # Tune pickles its callbacks into the experiment state; this one lives only in its driver.
            return (_unavailable, ("ProgressLine",))

    return ProgressLine()
