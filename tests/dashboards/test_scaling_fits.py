"""The Scaling & leverage view shows the numbers `moelab fit` wrote (the report's), not a second estimate."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.ablations.report import run_fit
from moelab.ablations.truth import SMALL_WORLD, write_truth_store
from moelab.dashboards import query as Q
from moelab.dashboards.app import Views


def test_scaling_view_reads_the_fits_table(tmp_path):
    write_truth_store(tmp_path, SMALL_WORLD, seed=3, metrics=True)
    a, _ = run_fit(tmp_path, sweep="truth", report_path=tmp_path / "r.html", n_boot=20, refine_top=32)
    views = Views(Q.Reader(str(tmp_path)))
    trials = views.trials("truth")
    fig, summary, pts, law, tl = views.scaling("truth", trials, "model.moe.n_experts")
    assert law is not None and law.source == "fits table"
    report = a.trials.set_index("trial_id")
    moe = tl[tl["family"] == "moe"].set_index("trial_id")
    assert len(moe) == (report["family"] == "moe").sum()
    for col, src in (("leverage", "compute_leverage"), ("leverage_lo", "compute_leverage_lo"),
                     ("leverage_hi", "compute_leverage_hi")):
        assert moe[col].to_numpy(float) == pytest.approx(report.loc[moe.index, src].to_numpy(float))
    fam = summary[summary["scope"] == "family"]
    expected = a.family_leverage
    assert sorted(fam["leverage"]) == pytest.approx(sorted(expected["leverage"]))
    assert set(summary["scope"]) == {"family", "size"}
    # the dense curve is the frontier of the report's dense fit
    from moelab.ablations.fits import frontier_loss
    C = np.geomspace(*law.c_range, 5)
    assert law.predict(C) == pytest.approx(frontier_loss(a.dense_fit.params, C, a.fpt["dense"]))
