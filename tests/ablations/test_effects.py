"""Tests for moelab.ablations.effects against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moelab.ablations.effects import effects


@pytest.fixture
def trials():
    # lr 1e-3: seeds 0, 1, 2 -> 1.0, 1.2, 1.4 (seed 2 logged twice: 1.3 and 1.5, averaged to 1.4)
    # lr 3e-3: seeds 0, 1    -> 0.8, 1.0
    # lr 1e-2: seed 0        -> 2.0 (a single seed)
    return pd.DataFrame({
        "lr": [1e-3, 1e-3, 1e-3, 1e-3, 3e-3, 3e-3, 1e-2, 3e-3],
        "seed": [0, 1, 2, 2, 0, 1, 0, 2],
        "loss": [1.0, 1.2, 1.3, 1.5, 0.8, 1.0, 2.0, np.nan],  # the NaN row is dropped
    })


def test_means_stderr_and_welch_difference(trials):
    out = effects(trials, "lr", "loss")
    assert list(out.index) == [1e-3, 3e-3, 1e-2]
    base, other = out.loc[1e-3], out.loc[3e-3]
    assert base["n"] == 3 and other["n"] == 2
    assert base["mean"] == pytest.approx(1.2)
    assert base["std"] == pytest.approx(0.2)                   # sqrt((0.04 + 0 + 0.04) / 2)
    assert base["stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert other["mean"] == pytest.approx(0.9)
    assert other["stderr"] == pytest.approx(0.1)               # sqrt(0.02) / sqrt(2)
    assert base["is_baseline"] and base["diff"] == 0.0
    # Welch by hand: se^2 = 0.04/3 + 0.02/2, dof = se^4 / ((0.04/3)^2/2 + 0.01^2/1)
    var_sum = 0.04 / 3 + 0.01
    dof = var_sum**2 / ((0.04 / 3) ** 2 / 2 + 0.01**2 / 1)
    half = stats.t.ppf(0.975, dof) * math.sqrt(var_sum)
    assert other["diff"] == pytest.approx(-0.3)
    assert other["diff_stderr"] == pytest.approx(math.sqrt(var_sum))
    assert other["dof"] == pytest.approx(dof)
    assert other["diff_lo"] == pytest.approx(-0.3 - half)
    assert other["diff_hi"] == pytest.approx(-0.3 + half)
    assert other["p_value"] == pytest.approx(2 * stats.t.sf(0.3 / math.sqrt(var_sum), dof))


def test_single_seed_group_has_no_interval(trials):
    row = effects(trials, "lr", "loss").loc[1e-2]
    assert row["n"] == 1 and row["mean"] == pytest.approx(2.0)
    assert row["diff"] == pytest.approx(0.8)
    assert np.isnan(row["stderr"]) and np.isnan(row["diff_lo"]) and np.isnan(row["diff_hi"])


def test_explicit_baseline_and_confidence(trials):
    out = effects(trials, "lr", "loss", baseline=3e-3, confidence=0.9)
    assert out.loc[3e-3, "is_baseline"] and not out.loc[1e-3, "is_baseline"]
    assert out.loc[1e-3, "diff"] == pytest.approx(0.3)
    var_sum = 0.04 / 3 + 0.01
    dof = var_sum**2 / ((0.04 / 3) ** 2 / 2 + 0.01**2 / 1)
    assert out.loc[1e-3, "diff_hi"] == pytest.approx(0.3 + stats.t.ppf(0.95, dof) * math.sqrt(var_sum))


def test_rows_without_seed_column_are_replicates():
    frame = pd.DataFrame({"router": ["topk", "topk", "sinkhorn", "sinkhorn"], "acc": [0.5, 0.7, 0.6, 0.6]})
    out = effects(frame, "router", "acc")
    assert list(out.index) == ["sinkhorn", "topk"]                  # sorted; baseline = smallest
    assert out.loc["topk", "n"] == 2 and out.loc["topk", "diff"] == pytest.approx(0.0)
    # sinkhorn has zero variance, topk does not: Welch still defined
    assert out.loc["topk", "diff_stderr"] == pytest.approx(math.sqrt(0.02 / 2))


def test_mixed_type_axis_keeps_first_seen_order():
    frame = pd.DataFrame({"k": ["auto", 2, 2, "auto"], "seed": [0, 0, 1, 1], "loss": [1.0, 2.0, 2.2, 1.2]})
    out = effects(frame, "k", "loss")
    assert list(out.index) == ["auto", 2]
    assert out.loc[2, "diff"] == pytest.approx(1.0)


def test_bad_arguments_raise(trials):
    with pytest.raises(ValueError, match="column 'nope' not in trials"):
        effects(trials, "nope", "loss")
    with pytest.raises(ValueError, match="baseline 0.5 is not among the values"):
        effects(trials, "lr", "loss", baseline=0.5)
    with pytest.raises(ValueError, match="no trials"):
        effects(trials.assign(loss=np.nan), "lr", "loss")
