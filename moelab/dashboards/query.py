"""The dashboard's data layer under its old name: every name this module held before it was split, for the
notebook, the benchmark and code written against it. New code imports from the module that does the job:

* `moelab.dashboards.reader`: `Reader` (cached, read-only), `StoreUnavailable`;
* `moelab.dashboards.trials`: axes, filters, the overview, the runs table, grouping;
* `moelab.dashboards.curves`: smoothing, M4 downsampling, seed aggregation, `curve_data`;
* `moelab.dashboards.effects`: per-axis effects, the parallel-coordinates frame;
* `moelab.dashboards.scaling`: the dense compute law and leverage;
* `moelab.dashboards.experts`: expert load, domain routing, specialisation;
* `moelab.dashboards.inputs`: the names a request may use (`METRICS`, `X_AXES`, ...) and their checks.
"""

from __future__ import annotations

from moelab.dashboards.curves import CurveData, aggregate_seeds, bucket_index, curve_data, ema, m4_downsample
from moelab.dashboards.effects import axis_effects, parallel_frame
from moelab.dashboards.experts import (domain_share_at, expert_imbalance, expert_load_at, expert_load_over_time,
                                       specialisation)
from moelab.dashboards.inputs import ALL_BUT_SEED, FINAL_METRICS, METRICS, X_AXES
from moelab.dashboards.reader import Reader, StoreUnavailable
from moelab.dashboards.scaling import (DenseLaw, dense_law, fits_law, fits_leverage, scaling_points,
                                       with_fits_leverage, with_leverage)
from moelab.dashboards.trials import (SEED_KEYS, assign_groups, axis_frame, axis_keys, filter_trials, group_keys,
                                      recent_failures, runs_table, sweeps_overview)

__all__ = [
    "StoreUnavailable", "Reader", "X_AXES", "METRICS", "FINAL_METRICS", "SEED_KEYS", "ALL_BUT_SEED",
    "axis_keys", "axis_frame", "filter_trials", "sweeps_overview", "recent_failures", "runs_table",
    "group_keys", "assign_groups", "ema", "bucket_index", "m4_downsample", "aggregate_seeds", "CurveData",
    "curve_data", "axis_effects", "DenseLaw", "dense_law", "fits_law", "with_leverage", "scaling_points",
    "fits_leverage", "with_fits_leverage", "expert_load_at", "expert_load_over_time", "expert_imbalance",
    "domain_share_at", "specialisation", "parallel_frame",
]
