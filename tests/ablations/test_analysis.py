"""The data floor `moelab fit` prints beside the dense law's E (moelab.ablations.analysis.data_floor)."""

import numpy as np
import pandas as pd
import pytest

from moelab.ablations.analysis import data_floor
from moelab.ablations.fits import ChinchillaFit
from moelab.ablations.report import _floor_lines
from moelab.trainers.data import SyntheticMarkov


def _trials(n: int = 3, **cols) -> pd.DataFrame:
    base = {"usable": True, "data.source": "synthetic", "data.seed": 3, "data.n_domains": 8, "data.n_symbols": 16,
            "data.concentration": 0.1, "train.seq_len": 32}
    base.update(cols)
    return pd.DataFrame([base] * n)


def test_the_floor_is_the_sources_own():
    fl = data_floor(_trials())
    src = SyntheticMarkov(8, 16, 0.1, 3)
    assert fl["bayes_loss"] == pytest.approx(src.bayes_loss(32))
    assert fl["entropy_rate"] == pytest.approx(src.entropy_rate())
    assert fl["seq_len"] == 32 and "8 Markov domains over 16 symbols" in fl["describe"]
    # another data seed is another source, with another floor
    assert data_floor(_trials(**{"data.seed": 4}))["bayes_loss"] != pytest.approx(fl["bayes_loss"], abs=1e-6)


def test_no_floor_when_it_is_not_one_known_source():
    t = _trials()
    assert data_floor(t.assign(**{"data.source": "stdlib"})) is None
    mixed = pd.concat([t, _trials(1, **{"data.n_domains": 4})], ignore_index=True)
    assert data_floor(mixed) is None
    assert data_floor(t.drop(columns=["data.n_domains"])) is None
    # unusable trials do not count
    mixed.loc[len(t):, "usable"] = False
    assert data_floor(mixed) is not None


class _A:
    def __init__(self, floor):
        self.data_floor = floor


def _fit(E: float, lo: float, hi: float) -> ChinchillaFit:
    f = ChinchillaFit.__new__(ChinchillaFit)
    f.E, f.intervals = E, {"E": [lo, hi]}
    return f


def test_the_report_reads_e_against_the_floor():
    fl = {"bayes_loss": 1.2, "entropy_rate": 1.15, "seq_len": 64, "describe": "8 Markov domains"}
    [good] = _floor_lines(_A(fl), _fit(1.21, 1.15, 1.25))
    assert "+0.8% off" in good and "agrees within 5%" in good and "covers" in good
    [bad] = _floor_lines(_A(fl), _fit(0.6, 1e-10, 1.1))
    assert "-50.0% off" in bad and "does not agree" in bad and "misses" in bad
    assert _floor_lines(_A(None), _fit(1.2, 1.1, 1.3)) == []
    assert np.isfinite(fl["bayes_loss"])
