"""Tian et al. 2025 Eq. 13 fitted on per-cell compute leverage (moelab.ablations.analysis `_el_points`,
`_fit_el_law`), checked on a planted world whose every leverage is known.

The world. Dense trials follow truth.World()'s Chinchilla law (E 1.9, A 400, B 2000, alpha 0.34, beta 0.37) at
4 sizes x 3 token budgets, C = 6 N D. The MoE trials are a 3 x 3 grid of designs: activation ratio A = top_k /
n_experts in {1/2, 1/4, 1/8} and moelab granularity G = d_ff / d_expert in {4, 8, 16} (n_experts = 2 G,
top_k scaled with it, fine-grained style), with d_model 512 and d_ff 2048 fixed so the paper's granularity
2 d_model / d_expert is G / 2 in {2, 4, 8}: the two conventions differ by a factor 2, so using the wrong one
moves the fitted optimal granularity by that factor. Every family runs at ONE token budget (2e8 tokens) and
two sizes (2e6, 2e7 active parameters; size goes through `model.n_layers`, a scale axis that `_design` does
not read), so no family can have a Chinchilla law of its own and the analysis must fall back to cells.

What is planted. Eq. 13 with constants EL_TRUE (Table 2's d and A_start, gamma 0.05 and beta -0.2 so the
optimal paper granularity is 2^2 = 4, inside the grid, and a = 0.86 so EL spans about 1.36-3.15 at this
world's C of 2.4e15 and 2.4e16). Each MoE trial's noise-free loss is the dense frontier's loss at EL(A, G, C)
x C, so its compute leverage against the dense compute-optimal frontier is exactly the law's EL. Every final
loss carries 0.1% multiplicative noise; 2 seeds per cell.

Measured on this world with seeds 0-7 of the noise (n_boot 20): per-cell compute leverage within 1.9% of the
law, the fitted law within 0.6% in the median over the 18 design points (1.5% at worst), optimal G 3.93-4.03.
A family planted 1.3 x off the law reads 29% high in its cells while the Huber fit stays within ~5% of the law.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from moelab.ablations.analysis import Analysis, _el_points, analyse_trials, fit_rows
from moelab.ablations.el_law import PAPER_EL_PARAMS, efficiency_leverage
from moelab.ablations.fits import FlopsPerToken, frontier_loss
from moelab.ablations.report import summary_text
from moelab.ablations.truth import World

DENSE = World().dense_params  # (E, A, B, alpha, beta)
EL_TRUE = dict(PAPER_EL_PARAMS, a=0.86, gamma=0.05, beta=-0.2)  # optimal paper G = 2^(0.2 / 0.1) = 4
D_MODEL, D_FF = 512, 2048
DENSE_SIZES, DENSE_TPP = (1e6, 3e6, 1e7, 3e7), (5.0, 20.0, 80.0)
MOE_SIZES, MOE_TOKENS = (2e6, 2e7), 2e8
TOP_K_AT_G4 = (4, 2, 1)  # with 8 experts at G = 4: A = 1/2, 1/4, 1/8
GRANULARITIES = (4, 8, 16)  # moelab's d_ff / d_expert; the paper's 2 d_model / d_expert is half of it
EMBEDDING = 100_000
DESIGN = ["model.moe.n_experts", "model.moe.top_k", "model.moe.granularity"]


def planted_world(noise: float = 0.001, seeds: int = 2, seed: int = 0,
                  off_law: tuple[tuple[int, int], float] | None = None,
                  second_budget: tuple[tuple[int, int], ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trial rows as `analyse_trials` reads them, truth: one row per MoE cell with its design and planted EL).

    off_law: ((top_k at G = 4, G), factor) plants that family's EL at factor x the law (a negative control).
    second_budget: the (top_k at G = 4, G) families that also run at 4x the tokens (so they get a law)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []

    def row(tid, family, s, N, N_total, D, L, axes, cfg):
        rows.append({"sweep": "el-cells", "trial_id": tid, "family": family, "status": "finished", "seed": s,
                     "attempt": 0, "name": tid, "axis_values": json.dumps(axes),
                     "params_total": int(N_total + EMBEDDING), "params_non_embedding": int(N_total),
                     "params_active": int(N + EMBEDDING), "flops_per_token": 6.0 * N, "final_step": 1000,
                     "final_tokens": int(D), "final_flops": 6.0 * N * D, "final_loss": L, "final_eval_loss": L,
                     "model.d_model": D_MODEL, "model.d_ff": D_FF, "model.moe.d_expert": 0,
                     "model.moe.n_shared": 0, "model.moe.d_shared": 0, **cfg})

    E, A, B, al, be = DENSE
    for i, N in enumerate(DENSE_SIZES):
        for tpp in DENSE_TPP:
            D = N * tpp
            for s in range(seeds):
                L = (E + A / N**al + B / D**be) * np.exp(rng.normal(0.0, noise))
                row(f"dense-n{i}-t{int(tpp)}-s{s}", "dense", s, N, N, D, float(L),
                    {"model.n_layers": 4 * (i + 1), "train.steps": int(tpp)},
                    {"model.moe.n_experts": 0, "model.moe.top_k": 0, "model.moe.granularity": 1})
    for k4 in TOP_K_AT_G4:
        for G in GRANULARITIES:
            n_experts, top_k = 8 * G // 4, k4 * G // 4
            ratio, g_paper = top_k / n_experts, 2.0 * D_MODEL / (D_FF / G)
            budgets = (MOE_TOKENS, 4 * MOE_TOKENS) if (k4, G) in second_budget else (MOE_TOKENS,)
            for (j, N), tokens in itertools.product(enumerate(MOE_SIZES), budgets):
                C = 6.0 * N * tokens
                el = float(efficiency_leverage(ratio, g_paper, C, EL_TRUE))
                if off_law is not None and off_law[0] == (k4, G):
                    el *= off_law[1]
                clean = float(frontier_loss(DENSE, [el * C], FlopsPerToken())[0])  # dense frontier at EL x C
                truth.append({"model.moe.n_experts": n_experts, "model.moe.top_k": top_k,
                              "model.moe.granularity": G, "A": ratio, "G_paper": g_paper, "N": N,
                              "D": tokens, "C": C, "EL": el,
                              "EL_law": float(efficiency_leverage(ratio, g_paper, C, EL_TRUE))})
                steps = 1000 * tokens // MOE_TOKENS
                axes = {"model.moe.n_experts": n_experts, "model.moe.top_k": top_k, "model.moe.granularity": G,
                        "model.n_layers": 8 * (j + 1), "train.steps": int(steps)}
                for s in range(seeds):
                    row(f"moe-k{k4}-g{G}-n{j}-t{int(steps)}-s{s}", "moe", s, N, N * n_experts / top_k, tokens,
                        float(clean * np.exp(rng.normal(0.0, noise))), axes,
                        {"model.moe.n_experts": n_experts, "model.moe.top_k": top_k, "model.moe.granularity": G})
    return pd.DataFrame(rows), pd.DataFrame(truth)


def cells_with_truth(a: Analysis, truth: pd.DataFrame) -> pd.DataFrame:
    """a.size_leverage joined with the planted cells through each group's design axis values."""
    moe = a.trials[a.trials["family"] == "moe"]
    design = moe.groupby("group")[DESIGN].first().reset_index()
    out = a.size_leverage.merge(design, on="group").merge(truth, on=[*DESIGN, "N", "D"], suffixes=("", "_true"))
    assert len(out) == len(a.size_leverage) == len(truth)
    return out


@pytest.fixture(scope="module")
def world():
    raw, truth = planted_world()
    return analyse_trials(raw, n_boot=60, seed=0), truth


def test_no_family_has_a_law_so_the_el_law_is_fitted_on_cells(world):
    a, truth = world
    assert list(a.family_fits) == ["dense"]  # one budget per family: every MoE law is skipped
    assert a.family_leverage is None or a.family_leverage.empty
    f = a.el_law
    assert f is not None and f.points == "cells"
    assert f.n_points == 18 and f.n_groups == 9  # 9 families x 2 sizes, bootstrap over whole families
    assert f.draws is not None and f.draws.shape == (60, 6)
    assert any("cell" in n and "Tian" in n for n in a.notes)
    # A and the paper's G as the analysis derived them from the config columns
    assert f.fit_range["A"] == pytest.approx([1 / 8, 1 / 2])
    assert f.fit_range["G"] == pytest.approx([2.0, 8.0])
    assert f.fit_range["G_moelab"] == pytest.approx([4.0, 16.0])
    assert f.fit_range["C"] == pytest.approx([2.4e15, 2.4e16])
    row = next(r for r in fit_rows(a) if r["law"] == "efficiency_leverage")
    assert row["parameters"]["points"] == "cells" and "(cells)" in row["message"]
    assert "points from cells" in summary_text(a)


def test_cell_compute_leverage_is_the_planted_el(world):
    a, truth = world
    cells = cells_with_truth(a, truth)
    assert cells["C"].to_numpy() == pytest.approx(cells["C_true"].to_numpy(), rel=1e-6)
    ratio = cells["compute_leverage"].to_numpy() / cells["EL"].to_numpy()
    assert np.max(np.abs(ratio - 1)) < 0.04, cells[["group", "N", "compute_leverage", "EL"]]


def test_fitted_law_recovers_the_planted_one(world):
    a, truth = world
    pred = a.el_law.predict(truth["A"], truth["G_paper"], truth["C"])
    err = np.abs(pred / truth["EL"].to_numpy() - 1)
    assert np.median(err) < 0.02 and np.max(err) < 0.05, err
    # the optimum in the paper's G (planted 4; in moelab's G it would be 8)
    assert a.el_law.optimal_granularity() == pytest.approx(4.0, rel=0.1)
    assert a.el_law.params["gamma"] == pytest.approx(EL_TRUE["gamma"], rel=0.2)
    assert a.el_law.params["d"] == pytest.approx(EL_TRUE["d"], rel=0.2)


def test_a_family_off_the_law_shows_in_its_cells():
    """Negative control: the centre design planted at 1.3 x the law. Its cells read ~1.3 x the law (the
    per-cell check above would fail on them), the others stay on it, and the Huber fit does not follow the
    one family: it predicts that family well below what its cells measured."""
    raw, truth = planted_world(off_law=((2, 8), 1.3))
    a = analyse_trials(raw, n_boot=0, seed=0)
    assert a.el_law is not None and a.el_law.points == "cells"
    cells = cells_with_truth(a, truth)
    off = (cells["model.moe.top_k"] == 4) & (cells["model.moe.granularity"] == 8)
    assert off.sum() == 2
    to_law = cells["compute_leverage"].to_numpy() / cells["EL_law"].to_numpy()
    assert to_law[off] == pytest.approx([1.3, 1.3], rel=0.04)
    assert np.max(np.abs(to_law[~off] - 1)) < 0.04
    pred = a.el_law.predict(cells["A"], cells["G_paper"], cells["C"])
    assert np.all(cells["compute_leverage"].to_numpy()[off] / pred[off] > 1.15)


# ------------------------------------------------------------------------------------------ _el_points


def _bare() -> Analysis:
    return Analysis(root="", sweep=None, sweeps=[], points="final", loss="eval_loss",
                    n_column="active_non_embedding", n_boot=0, confidence=0.95, trials=pd.DataFrame())


SIZE = pd.DataFrame({"group": ["moe[x=1]", "moe[x=1]", "moe[x=2]"], "N": [1e6, 1e7, 1e6], "D": [2e8] * 3,
                     "C": [1.2e15, 1.2e16, 1.2e15], "compute_leverage": [1.5, 1.7, np.inf],
                     "parameter_leverage": [9.0, 9.0, 9.0]})
FAMILY = pd.DataFrame({"group": ["moe[x=1]", "moe[x=1]", "moe[x=2]"], "at_compute": [1e15, 1e16, 1e15],
                       "headline": [True, False, True], "leverage": [2.0, 2.2, 3.0], "leverage_lo": [1.0] * 3,
                       "leverage_hi": [4.0] * 3})


def test_el_points_offers_family_laws_first_then_cells():
    a = _bare()
    a.family_leverage, a.size_leverage = FAMILY, SIZE
    (fam, source), (cells, second) = _el_points(a)
    assert (source, second) == ("family laws", "cells")
    assert list(fam.columns) == ["group", "at_compute", "EL"]
    assert fam["EL"].tolist() == [2.0, 2.2, 3.0] and fam["at_compute"].tolist() == [1e15, 1e16, 1e15]
    assert cells["EL"].tolist() == SIZE["compute_leverage"].tolist()


@pytest.mark.parametrize("family", [None, FAMILY.iloc[:0], FAMILY[FAMILY["group"] == "moe[x=1]"]],
                         ids=["none", "empty", "one family"])
def test_el_points_falls_back_to_cells(family):
    a = _bare()
    a.family_leverage, a.size_leverage = family, SIZE
    [(pts, source)] = _el_points(a)
    assert source == "cells"
    assert list(pts.columns) == ["group", "at_compute", "EL"]
    assert pts["group"].tolist() == SIZE["group"].tolist()
    assert pts["EL"].tolist() == SIZE["compute_leverage"].tolist()  # +inf kept here; _fit_el_law drops it
    assert pts["at_compute"].tolist() == SIZE["C"].tolist()


def test_el_points_with_nothing():
    a = _bare()
    assert _el_points(a) == []
    a.size_leverage = SIZE[SIZE["group"] == "moe[x=1]"]
    assert _el_points(a) == []  # one family cannot vary A or G


def test_two_families_with_laws_do_not_hide_the_cells_of_all_nine():
    """Two of the nine designs also ran at a second budget, so they get laws of their own: two families
    cannot vary G over three values, so the fit falls back to all nine families' cells and says why."""
    raw, _ = planted_world(second_budget=((2, 4), (4, 8)))
    a = analyse_trials(raw, n_boot=0, seed=0)
    assert a.family_leverage is not None and a.family_leverage["group"].nunique() == 2
    assert a.el_law is not None and a.el_law.points == "cells" and a.el_law.n_groups == 9
    assert any("families' own laws could not fit it" in n for n in a.notes)


def test_points_outside_the_laws_regime_are_said_so():
    """EL < 1 or an A_start above the measured A: the fitted constants describe the points but are not
    Table 2's quantities, and the analysis says why; a world inside the regime gets no such note."""
    from moelab.ablations.analysis import _el_regime
    from moelab.ablations.el_law import PAPER_EL_PARAMS, ELFit

    fit = ELFit(params=dict(PAPER_EL_PARAMS), objective=0.0, n_points=4, n_groups=2, fit_range={})
    inside = pd.DataFrame({"EL": [1.4, 2.0, 3.1, 1.2], "A": [0.5, 0.25, 0.125, 0.5]})
    assert _el_regime(fit, inside) == []
    below = inside.assign(EL=[0.7, 2.0, 3.1, 0.4])
    [note] = _el_regime(fit, below)
    assert "2 of 4 points have EL < 1" in note
    saturated = ELFit(params={**PAPER_EL_PARAMS, "A_start": 0.99}, objective=0.0, n_points=4, n_groups=2,
                      fit_range={})
    notes = _el_regime(saturated, below)
    assert len(notes) == 2 and "A_start = 0.99" in notes[1] and "(0.125)" in notes[1]
    a = analyse_trials(planted_world()[0], n_boot=0, seed=0)
    assert not any("regime" in n or "A_start =" in n for n in a.notes)
