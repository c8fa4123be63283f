"""The sweep's progress line, fed by Tune callback events without Ray running (the sweeps in
test_controller.py check it end to end)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moelab.platform.progress import SweepProgress, make_progress


def test_progress_counts_trials_and_estimates_from_the_sweeps_own_pace():
    status = {"a": "finished", "b": "pending", "c": "pending", "d": "pending"}  # a: done before a resume
    snaps: list = []
    cb = make_progress("sw", {"b": 1000, "c": 1000, "d": 1000}, status, 4, snaps.append, interval_s=3600)
    b, c = (SimpleNamespace(config={"trial_id": t}) for t in "bc")
    cb.on_trial_start(0, [], b)
    assert (snaps[-1].done, snaps[-1].running, snaps[-1].pending, snaps[-1].eta_s) == (1, 1, 2, None)
    cb.on_trial_result(0, [], b, {"step": 2, "tokens": 500, "tokens_per_s": 250.0})
    assert len(snaps) == 1  # between trial events at most one line per interval
    cb.first_start -= 10.0  # the first trial started 10 s ago: the sweep trains 50 tokens/s so far
    cb.on_trial_start(0, [], c)
    p = snaps[-1]
    assert (p.running, p.pending, p.tokens_per_s) == (2, 1, 250.0)
    assert p.eta_s == pytest.approx((500 + 1000 + 1000) / 50, rel=0.05)
    # c resumed from a checkpoint at 400 tokens: those were trained before, not at this sweep's pace
    cb.on_trial_result(0, [], c, {"backfill": [{"step": 2, "tokens": 400}], "restored_from": "/ckpt"})
    status["b"] = "finished"
    cb.on_trial_complete(0, [], b)
    p = snaps[-1]
    assert (p.done, p.running, p.pending, p.tokens_per_s) == (2, 1, 1, 0.0)
    assert p.eta_s == pytest.approx((600 + 1000) / 50, rel=0.05)
    status["c"] = "diverged"
    cb.on_trial_complete(0, [], c)
    assert snaps[-1].line().startswith("sweep sw: 3/4 done (1 diverged), 0 running, 1 pending | 0 tok/s | ETA ")


@pytest.mark.parametrize("seconds, text", [(None, "-"), (0.4, "0s"), (59.6, "1m00s"), (75, "1m15s"),
                                           (3600 * 2 + 61, "2h01m")])
def test_eta_reads_in_seconds_minutes_or_hours(seconds, text):
    p = SweepProgress(sweep="sw", total=3, finished=1, diverged=0, failed=1, running=1, pending=0,
                      tokens_per_s=2.5e6, eta_s=seconds, elapsed_s=12)
    assert p.line() == f"sweep sw: 2/3 done (1 failed), 1 running, 0 pending | 2.5M tok/s | ETA {text} | 12s elapsed"
