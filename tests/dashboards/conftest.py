"""Fixtures for the dashboard tests.

* `dash_store` (session): a synthetic store (moelab.platform.fixtures: 18 trials = 3 dense sizes + a 2 x 3 MoE
  grid, 2 seeds, 50 logged steps, one restarted and one diverged trial) in several metric batches per trial.
  Read-only: tests that write make their own with `make_dash_store`.
* `reader`: a fresh `Reader` over `dash_store` (its caches start empty).
"""

from __future__ import annotations

import pytest

from moelab.dashboards.query import Reader
from moelab.platform.fixtures import synthetic_store


@pytest.fixture(scope="session")
def dash_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash-store") / "store"
    return synthetic_store(str(root), n_steps=50, batch_steps=20)


@pytest.fixture
def make_dash_store():
    return synthetic_store


@pytest.fixture
def reader(dash_store):
    return Reader(dash_store.root)
