"""What the Experts view shows: expert load per layer at a step and over time, load imbalance, where each
data domain's tokens were routed, and how specialised the experts are (mutual information of domain and
expert). Pure functions over the reader's `experts` and `routing` rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelab.dashboards.sql import sql

__all__ = ["expert_load_at", "expert_load_over_time", "expert_imbalance", "domain_share_at", "specialisation"]


def expert_load_at(experts: pd.DataFrame, step: int | None = None) -> tuple[int | None, pd.DataFrame]:
    """(step used, layer x expert matrix of load) at the logged step nearest to `step` (None: the last)."""
    if not len(experts):
        return None, pd.DataFrame()
    steps = np.sort(experts["step"].unique())
    if step is None:
        use = int(steps[-1])
    else:
        use = int(steps[np.argmin(np.abs(steps - int(step)))])
    at = experts[experts["step"] == use]
    return use, at.pivot_table(index="layer", columns="expert", values="load", aggfunc="mean").sort_index()


def expert_load_over_time(experts: pd.DataFrame, layer: int, n_buckets: int = 200) -> pd.DataFrame:
    """Expert x time matrix of one layer's load: columns = step buckets (labelled by the bucket's mean step),
    each the mean load over the logged steps in it; at most `n_buckets` columns."""
    e = experts[experts["layer"] == layer]
    if not len(e):
        return pd.DataFrame()
    q = f"""
    WITH s AS (SELECT min(step) lo, max(step) hi FROM t),
    k AS (SELECT t.*, least(CAST(floor(CASE WHEN hi > lo THEN (step - lo) / (hi - lo) ELSE 0 END * {n_buckets})
                             AS BIGINT), {n_buckets - 1}) AS bucket FROM t, s)
    SELECT bucket, expert, avg(step) AS step, avg(load) AS load FROM k GROUP BY ALL ORDER BY bucket, expert
    """
    out = sql(q, t=e[["step", "expert", "load"]])
    steps = out.groupby("bucket")["step"].mean().round().astype(int)
    mat = out.pivot_table(index="expert", columns="bucket", values="load")
    mat.columns = steps.reindex(mat.columns).to_numpy()
    return mat


def expert_imbalance(experts: pd.DataFrame) -> pd.DataFrame:
    """Per step and layer: imbalance = max load / mean load (1 = balanced; E = one expert takes all),
    and the coefficient of variation of the load. Columns step, layer, imbalance, cv."""
    q = """SELECT step, layer, max(load) / avg(load) AS imbalance, stddev_pop(load) / avg(load) AS cv
           FROM t GROUP BY step, layer ORDER BY layer, step"""
    return sql(q, t=experts[["step", "layer", "load"]])


def _nearest_step(steps: np.ndarray, step: int | None) -> int:
    steps = np.sort(np.unique(steps))
    return int(steps[-1] if step is None else steps[np.argmin(np.abs(steps - int(step)))])


def domain_share_at(routing: pd.DataFrame, layer: int, step: int | None = None) -> tuple[int | None, pd.DataFrame]:
    """(step used, domain x expert matrix) of one layer at the logged step nearest to `step` (None: the last).

    share[d, e] = tokens[d, e] / sum_e' tokens[d, e']: where domain d's routed tokens went (each row sums to
    1; a domain without tokens is NaN). Empty when the layer has no rows.
    """
    r = routing[routing["layer"] == layer] if len(routing) else routing
    if not len(r):
        return None, pd.DataFrame()
    use = _nearest_step(r["step"].to_numpy(), step)
    counts = r[r["step"] == use].pivot_table(index="domain", columns="expert", values="tokens", aggfunc="sum")
    counts = counts.sort_index().sort_index(axis=1).astype(float)
    return use, counts.div(counts.sum(axis=1).where(lambda x: x > 0), axis=0)


def specialisation(routing: pd.DataFrame) -> pd.DataFrame:
    """How much an expert's identity tells about the domain, per step and layer: columns step, layer,
    specialisation.

    With p(d, e) = tokens[d, e] / N over the (step, layer)'s routed slots, p(d), p(e) its marginals:

        specialisation = I(D; E) / H(D),   I(D; E) = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e))),
                                           H(D) = -sum_d p(d) log p(d)

    = 1 - H(D | E) / H(D): 1 when every expert sees a single domain (perfectly specialised), 0 when every
    domain spreads over the experts in the same proportions (routing independent of the domain). NaN when
    H(D) = 0 (a single domain: nothing to tell apart).
    """
    cols = ["step", "layer", "specialisation"]
    if not len(routing):
        return pd.DataFrame(columns=cols)
    r = routing[routing["tokens"] > 0][["step", "layer", "domain", "expert", "tokens"]].astype(
        {"tokens": float})  # 0 log 0 = 0: empty cells add nothing
    g = ["step", "layer"]
    n = r.groupby(g)["tokens"].transform("sum")
    nd = r.groupby([*g, "domain"])["tokens"].transform("sum")
    ne = r.groupby([*g, "expert"])["tokens"].transform("sum")
    mi = (r["tokens"] / n * np.log(r["tokens"] * n / (nd * ne))).groupby([r["step"], r["layer"]]).sum()
    dom = r.groupby([*g, "domain"])["tokens"].sum()
    q = dom / dom.groupby(level=g).transform("sum")
    h = -(q * np.log(q)).groupby(level=g).sum()
    spec = (mi / h.where(h > 1e-12)).clip(0.0, 1.0)  # clip: rounding can leave I a hair outside [0, H]
    return spec.rename("specialisation").reset_index().sort_values(["layer", "step"]).reset_index(drop=True)
