"""A sweep file that expands to too many trials is refused at validation, before any trial is built
(issue 16, point 6): a typo'd axis can mean 10^6 trials, which used to take minutes to say anything."""

import textwrap
import time

import pytest

from moelab.cli import main
from moelab.platform.spec import MAX_TRIALS, SpecError, expand, load_spec, parse_spec


def big(n_values=1000, **extra):
    return {"name": "big", "base": {"preset": "moe-tiny"}, "baselines": [{"preset": "tiny"}],
            "axes": {"optim.lr": [1e-3 * (1 + i) for i in range(n_values)],
                     "upcycle.noise_std": [1e-6 * i for i in range(n_values)]}, "seeds": [0], **extra}


def test_a_million_trial_grid_is_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=r"max_trials: the sweep expands to 1,000,001 trials .*optim.lr \(1000\) x "
                                        r"upcycle.noise_std \(1000\).*at most max_trials=10000"):
        parse_spec(big())
    assert time.perf_counter() - t0 < 1.0 and MAX_TRIALS == 10_000


def test_the_limit_counts_seeds_and_baselines_and_is_overridable():
    small = {**big(3), "seeds": [0, 1]}  # 3 x 3 x 2 grid trials + 2 baseline trials = 20
    with pytest.raises(SpecError, match="20 trials"):
        parse_spec({**small, "max_trials": 19})
    assert len(expand(parse_spec({**small, "max_trials": 20}))) == 20
    with pytest.raises(SpecError, match="max_trials"):
        parse_spec({**small, "max_trials": 0})


def test_the_cli_refuses_before_anything_runs(tmp_path, capsys):
    p = tmp_path / "big.yaml"
    p.write_text(textwrap.dedent("""\
        name: big
        base: {preset: moe-tiny}
        axes:
          optim.lr: [%s]
          train.steps: [%s]
        """ % (", ".join(f"{1e-4 * (i + 1):g}" for i in range(200)), ", ".join(str(i + 1) for i in range(200)))))
    t0 = time.perf_counter()
    assert main(["sweep", str(p), "--dry-run"]) == 2
    assert "40,000 trials" in capsys.readouterr().err and time.perf_counter() - t0 < 5
    p.write_text(p.read_text() + "max_trials: 40000\n")
    assert load_spec(p).max_trials == 40_000
