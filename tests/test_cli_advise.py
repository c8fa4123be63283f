"""`moelab advise`: the optimal granularity, EL against the activation ratio with the shapes and `moelab plan`
memory that realise it, from Tian et al.'s Table 2 or from a law in a fits table; errors that say what to do."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from moelab.ablations import el_law
from moelab.cli import main
from moelab.platform.fitstable import fits_table, write_fits_table
from moelab.trainers.config import MoEConfig, ModelConfig, RunConfig, preset
from moelab.trainers.plan import PlanInputs, make_plan


def advise_json(capsys, *args):
    assert main(["advise", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fails(capsys, *args):
    """Run `moelab advise` expecting exit 2; returns stderr."""
    with pytest.raises(SystemExit) as e:  # argparse errors exit; our own checks return 2
        raise SystemExit(main(["advise", *args]))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory):
    """A store whose fits table holds an efficiency_leverage law fitted to a planted world (budgets 1e18-1e20)."""
    rng = np.random.default_rng(0)
    A, G = (v.ravel() for v in np.meshgrid([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32], [2.0, 4.0, 8.0, 16.0, 32.0]))
    fam = np.repeat(np.arange(len(A)), 3)
    A, G, C = A[fam], G[fam], np.tile([1e18, 1e19, 1e20], len(A))
    el = el_law.efficiency_leverage(A, G, C, el_law.PAPER_EL_PARAMS) * np.exp(rng.normal(0, 0.03, len(A)))
    fit = el_law.fit_efficiency_leverage(A, G, C, el, groups=fam, n_boot=60, seed=1)
    root = tmp_path_factory.mktemp("store")
    write_fits_table(str(root), "el-sweep", fits_table(el_law.el_law_rows(fit)))
    return str(root), fit


def test_help_has_examples():
    r = subprocess.run([sys.executable, "-m", "moelab", "advise", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    assert "examples:" in r.stdout and "moelab advise --budget" in r.stdout and "--params paper" in r.stdout


def test_paper_constants_text(capsys):
    assert main(["advise", "--budget", "1e22", "--params", "paper", "--max-total-params", "5e10"]) == 0
    out = capsys.readouterr().out
    assert "11.34 (2^3.50)" in out                       # Tian et al.'s optimal G of about 2^3.5
    assert "not given" in out and "no intervals" in out   # no compute range, no bootstrap for Table 2
    assert "moelab's G = d_ff / d_expert" in out
    assert "stopped at the smallest A under --max-total-params" in out


def test_paper_ladder_shapes_and_memory(capsys):
    r = advise_json(capsys, "--budget", "1e22", "--params", "paper", "--active-params", "8.5e8",
                    "--max-total-params", "5e10", "--gpus", "16")
    assert math.log2(r["G_opt"]) == pytest.approx(3.503, abs=1e-3)
    assert r["intervals"] is False and "G_opt_interval" not in r
    rows = r["rows"]
    # EL grows as A falls, below its limit as A -> 0
    assert [x["A_target"] for x in rows] == sorted((x["A_target"] for x in rows), reverse=True)
    assert all(b["EL"] > a["EL"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["EL"] < r["saturation"]["EL"]
    # the last row is the smallest A whose shape fits the total-parameter limit: 8 more experts would not
    assert rows[-1]["params_total"] <= 5e10
    sh = r["shape"]
    per_expert = 3 * sh["d_model"] * sh["d_expert"] + sh["d_model"]  # SwiGLU weights + router row, per layer
    assert rows[-1]["params_total"] + 8 * per_expert * sh["n_layers"] > 5e10
    # EL above 6 is flagged: the paper fitted on EL < 6
    assert all(bool(x["extrapolated"]) == (x["EL"] >= 6) for x in rows)
    # the paper's headline design, 0.85B active / 17.5B total at A ~ 3.1%, comes out of the same sizing
    near = min(rows, key=lambda x: abs(x["A_target"] - 1 / 32))
    assert near["params_total"] == pytest.approx(17.5e9, rel=0.1)
    for x in rows:
        # each shape realises its row: A and G as the paper defines them, from the counts printed
        assert x["A"] == pytest.approx((x["top_k"] + x["n_shared"]) / (x["n_experts"] + x["n_shared"]))
        assert x["G_paper"] == pytest.approx(2 * sh["d_model"] / x["d_expert"])
        assert x["EL_shape"] == pytest.approx(float(el_law.efficiency_leverage(x["A"], x["G_paper"], 1e22,
                                                                               el_law.PAPER_EL_PARAMS)))
    # the memory is `moelab plan`'s for that shape (rebuilt here from the printed fields)
    x = rows[1]
    m = ModelConfig(vocab_size=50304, d_model=sh["d_model"], n_layers=sh["n_layers"], n_heads=sh["n_heads"],
                    d_ff=sh["d_ff"], max_seq_len=4096, qk_norm="full",
                    moe=MoEConfig(n_experts=x["n_experts"], top_k=x["top_k"], d_expert=x["d_expert"],
                                  n_shared=x["n_shared"], renormalize=False))
    assert m.param_counts()["total"] == x["params_total"]
    plan = make_plan(RunConfig(model=m, train=preset("moe-1b").train), PlanInputs(gpus=16, ep=x["plan"]["ep"]))
    assert x["plan"]["mem_total_gib"] == pytest.approx(plan["mem_total_gib"])
    assert x["n_experts"] % x["plan"]["ep"] == 0 and 16 % x["plan"]["ep"] == 0
    # the active size asked for is what the shapes have
    assert sh["active_non_embedding"] == pytest.approx(8.5e8, rel=0.25)


def test_without_a_limit_the_ladder_runs_to_saturation(capsys):
    r = advise_json(capsys, "--budget", "1e21", "--params", "paper", "--active-params", "3e8")
    assert r["stop"].startswith("EL within 1%")
    assert r["rows"][-1]["EL"] >= 0.99 * r["saturation"]["EL"]
    assert r["active_params_source"] == "--active-params"
    r = advise_json(capsys, "--budget", "1e21", "--params", "paper")
    assert r["active_params"] == pytest.approx(math.sqrt(1e21 / 120))


def test_fitted_law_with_intervals(capsys, fitted_store):
    root, fit = fitted_store
    r = advise_json(capsys, "--budget", "1e19", "--fits", root, "--max-total-params", "2e9")
    assert r["G_opt"] == pytest.approx(fit.optimal_granularity())
    lo, hi = r["G_opt_interval"]
    assert lo < r["G_opt"] < hi
    for x in r["rows"]:
        lo, hi = x["EL_interval"]
        assert lo < x["EL"] < hi
    assert not any("budget" in n for n in r["notes"])  # 1e19 is inside the fitted 1e18..1e20
    assert main(["advise", "--budget", "1e19", "--fits", root, "--sweep", "el-sweep"]) == 0
    out = capsys.readouterr().out
    assert "95% intervals from 60 bootstrap resamples of whole groups" in out and "95% interval [" in out


def test_fitted_law_outside_its_range_says_so(capsys, fitted_store):
    root, _ = fitted_store
    r = advise_json(capsys, "--budget", "1e23", "--fits", root, "--max-total-params", "1e12")
    assert any("extrapolation: the budget 1e+23 FLOPs is outside the fitted compute range [1e+18, 1e+20]" in n
               for n in r["notes"])
    # A below the fitted 1/32 is flagged row by row
    assert any("A outside the fitted" in " ".join(x["extrapolated"]) for x in r["rows"] if x["A"] < 1 / 32)


def test_no_law_in_the_store_says_how_to_get_one(capsys, tmp_path):
    rows = [{"family": "dense", "law": "chinchilla", "scope": "law", "status": "ok", "parameters": {"E": 1.0}}]
    write_fits_table(str(tmp_path), "s1", fits_table(rows))
    err = fails(capsys, "--budget", "1e20", "--fits", str(tmp_path))
    assert "no `efficiency_leverage` law" in err and "chinchilla" in err
    assert "fit_efficiency_leverage" in err and "--params paper" in err
    err = fails(capsys, "--budget", "1e20", "--fits", str(tmp_path / "nowhere"))
    assert "--fits" in err and "not a directory" in err


def test_skipped_and_ambiguous_laws(capsys, tmp_path, fitted_store):
    skipped = [{"family": "moe", "law": "efficiency_leverage", "scope": "law", "status": "skipped",
                "message": "only one granularity"}]
    write_fits_table(str(tmp_path), "a", fits_table(skipped))
    err = fails(capsys, "--budget", "1e20", "--fits", str(tmp_path))
    assert "skipped (only one granularity)" in err
    _, fit = fitted_store
    for sweep in ("a", "b"):
        write_fits_table(str(tmp_path), sweep, fits_table(el_law.el_law_rows(fit)))
    err = fails(capsys, "--budget", "1e20", "--fits", str(tmp_path))
    assert "--sweep" in err and "a | b" in err
    assert main(["advise", "--budget", "1e20", "--fits", str(tmp_path), "--sweep", "b"]) == 0


@pytest.mark.parametrize("args, expected", [
    (["--budget", "lots", "--params", "paper"], "--budget: got 'lots'; allowed: a positive number of training FLOPs"),
    (["--budget=-1e20", "--params", "paper"], "--budget: got '-1e20'"),
    (["--budget", "0", "--params", "paper"], "--budget: got '0'"),
    (["--budget", "1e20", "--params", "book"], "--params: invalid choice: 'book' (choose from"),
    (["--budget", "1e20"], "one of the arguments --fits --params is required"),
    (["--budget", "1e20", "--params", "paper", "--max-total-params", "1e6"],
     "--max-total-params: got 1e+06; allowed: at least"),
    (["--budget", "1e20", "--params", "paper", "--active-params", "0"], "--active-params: got '0'"),
    (["--budget", "1e20", "--params", "paper", "--gpus", "3"], "--gpus: got 3; allowed: [1, 2, 4, 8, 16, 32, 64, 128]"),
    (["--budget", "1e20", "--params", "paper", "--sweep", "x"], "--sweep: got 'x'; allowed: only with --fits ROOT"),
])
def test_bad_input_names_the_flag(capsys, args, expected):
    assert expected in fails(capsys, *args)
