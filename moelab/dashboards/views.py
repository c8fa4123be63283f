"""What each dashboard view shows, computed from the store: `Views` turns (sweep, filtered trials, the view's
control values) into figures and the frames behind them. Values reach here checked
(`moelab.dashboards.inputs`); the callbacks, bench/dashboard_bench.py and the tests call it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import pandas as pd

from moelab.dashboards import figures as F
from moelab.dashboards.curves import CurveData, curve_data
from moelab.dashboards.effects import axis_effects, parallel_frame
from moelab.dashboards.experts import (domain_share_at, expert_imbalance, expert_load_at, expert_load_over_time,
                                       specialisation)
from moelab.dashboards.inputs import ALL_BUT_SEED
from moelab.dashboards.reader import Reader
from moelab.dashboards.scaling import (DenseLaw, ELSurface, dense_law, el_surface, fits_law, fits_leverage,
                                       scaling_points, with_fits_leverage, with_leverage)
from moelab.dashboards.trials import axis_keys, filter_trials, recent_failures, runs_table, sweeps_overview

__all__ = ["Views"]


class Views:
    """What each view shows, computed from the store: figures and the frames behind them (the CSV buttons
    download those frames). The app's callbacks call these; so does bench/dashboard_bench.py."""

    def __init__(self, reader: Reader, memo_size: int = 16):
        self.reader = reader
        self._memo: OrderedDict[tuple, CurveData] = OrderedDict()
        self._memo_size = memo_size
        self._lock = threading.Lock()

    def _curve_data(self, sweep: str, trials: pd.DataFrame, *args: Any, **kw: Any) -> CurveData:
        """`curves.curve_data`, remembered for the last few (sweep files, trials, arguments): switching views,
        log y or back to an earlier grouping costs nothing until the sweep's files change."""
        key = (sweep, self.reader.version(sweep), tuple(trials["trial_id"]), args, tuple(sorted(kw.items())))
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        cd = curve_data(self.reader, sweep, trials, *args, **kw)
        with self._lock:
            self._memo[key] = cd
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return cd

    def trials(self, sweep: str | None, status: list[str] | None = None,
               family: list[str] | None = None) -> pd.DataFrame:
        t = self.reader.trials()
        return t.iloc[0:0] if sweep is None else filter_trials(t, sweep, status, family)

    def dense_law(self, sweep: str) -> DenseLaw | None:
        """The sweep's dense compute law: from its `fits` table when that has one, else fitted on all of the
        sweep's finished dense runs (whatever the status / family filter)."""
        law = fits_law(self.reader.fits(sweep))
        return law if law is not None else dense_law(self.trials(sweep))

    def with_leverage(self, sweep: str, trials: pd.DataFrame) -> tuple[pd.DataFrame, DenseLaw | None]:
        law = self.dense_law(sweep)
        return with_leverage(trials, law), law

    def overview(self) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
        trials = self.reader.trials()
        ov = sweeps_overview(trials, self.reader.sweeps())
        fails = recent_failures(trials)
        if "updated_at" in fails:
            fails["updated_at"] = fails["updated_at"].astype(str)
        return F.overview_figure(ov), ov, fails

    def runs(self, trials: pd.DataFrame, only_differing: bool = True) -> pd.DataFrame:
        return runs_table(trials, only_differing=only_differing)

    def curve_data(self, sweep: str, trials: pd.DataFrame, metric: str = "loss", x: str = "step",
                   log: list[str] | None = None, smooth: float = 0.0, group: Any = (ALL_BUT_SEED,)) -> CurveData:
        grp = ALL_BUT_SEED if group and ALL_BUT_SEED in group else (tuple(group) if group else None)
        return self._curve_data(sweep, trials, metric, x, group=grp, smoothing=float(smooth or 0),
                                log_x="x" in (log or []))

    def curves(self, sweep: str, trials: pd.DataFrame, metric: str = "loss", x: str = "step",
               log: list[str] | None = None, smooth: float = 0.0, group: Any = (ALL_BUT_SEED,)):
        cd = self.curve_data(sweep, trials, metric, x, log, smooth, group)
        rev = f"{sweep}|{metric}|{x}|{','.join(log or [])}"
        return F.curves_figure(cd, log_x="x" in (log or []), log_y="y" in (log or []), uirevision=rev), cd

    def effects_frame(self, sweep: str, trials: pd.DataFrame, axis: str, metric: str = "final_loss",
                      baseline: Any = None, split: str | None = None) -> pd.DataFrame:
        if metric == "leverage":
            trials, law = self.with_leverage(sweep, trials)
            if law is None:
                raise ValueError("leverage needs a dense law: the sweep has fewer than 2 dense compute budgets "
                                 "finished and no `fits` table")
        return axis_effects(trials, axis, metric, baseline=baseline, split=split)

    def effects(self, sweep: str, trials: pd.DataFrame, axis: str, metric: str = "final_loss",
                baseline: Any = None, split: str | None = None):
        eff = self.effects_frame(sweep, trials, axis, metric, baseline, split)
        return F.effects_figure(eff, axis, metric), eff

    def scaling(self, sweep: str, trials: pd.DataFrame, color: str | None = None):
        """(figure, per-label leverage summary, points, law, trials with leverage)."""
        law = self.dense_law(sweep)
        stored = fits_leverage(self.reader.fits(sweep))
        # the report's numbers when `moelab fit` has run (never a second, different estimate next to them)
        tl = with_leverage(trials, law) if stored is None else with_fits_leverage(trials, stored[0])
        pts = scaling_points(tl, color)
        done = tl[tl["status"] == "finished"]
        curves = None
        if len(done):
            cd = self._curve_data(sweep, done, "loss", "flops", group=("family",), log_x=True, point_budget=30_000,
                                  aggregate=False)
            if len(cd.runs):
                fam = dict(zip(done["trial_id"], done["family"] if "family" in done else "moe"))
                curves = cd.runs.assign(group=cd.runs["run"].map(fam))
        moe = pts[pts["family"] == "moe"]
        if stored is not None:
            return F.scaling_figure(pts, law, curves), stored[1], pts, law, tl
        summary = moe.groupby("label").agg(
            n=("trial_id", "size"), mean_loss=("L", "mean"), mean_compute=("C", "mean"),
            mean_leverage=("leverage", "mean"), min_leverage=("leverage", "min"),
            max_leverage=("leverage", "max")).reset_index() if len(moe) else pd.DataFrame()
        return F.scaling_figure(pts, law, curves), summary, pts, law, tl

    # Why no efficiency-leverage surface is drawn: the page's one line about it.
    NO_EL_LAW = ("No efficiency-leverage law in this sweep's fits table: run `moelab fit` on a sweep that varies "
                 "A, G and C.")

    def el_surface(self, sweep: str, budget: float | None = None) -> tuple[Any, str, ELSurface | None]:
        """(figure, note, surface) of the sweep's efficiency-leverage law at `budget` FLOPs (None: the middle
        of the fitted compute range); a message figure and NO_EL_LAW when its fits table has no such law.
        ValueError for a budget `scaling.el_surface` refuses."""
        s = el_surface(self.reader.fits(sweep), budget)
        if s is None:
            return F.message_figure(self.NO_EL_LAW), self.NO_EL_LAW, None
        fitted = f" on {s.n_points} points" if s.n_points is not None else ""
        note = (f"Eq. 13 as `moelab fit` fitted it{fitted}; colour = EL, the dense compute that reaches the same "
                f"loss over the MoE's, at C = {s.budget:.4g} FLOPs (default {s.default_budget:.4g}).")
        if s.extrapolated:
            note += " This budget is outside the fitted compute range: the surface is an extrapolation."
        if s.G_opt is None:
            note += " The fitted gamma is not positive, so EL has no optimal granularity."
        return F.el_surface_figure(s), note, s

    def experts_data(self, sweep: str, trial: str, step: int | None = None, layer: int = 0):
        e = self.reader.experts(sweep, trial)
        used, mat = expert_load_at(e, step)
        over = expert_load_over_time(e, int(layer or 0))
        imb = expert_imbalance(e) if len(e) else pd.DataFrame(columns=["step", "layer", "imbalance", "cv"])
        m = self.reader.metrics(sweep, [trial], ["imbalance", "drop_frac"])
        return e, used, mat, over, imb, m

    def routing_data(self, sweep: str, trial: str, step: int | None = None, layer: int = 0):
        """(routing rows, step used, domain x expert share at `layer`, specialisation per step and layer)."""
        r = self.reader.routing(sweep, trial)
        used, share = domain_share_at(r, int(layer or 0), step)
        return r, used, share, specialisation(r)

    @staticmethod
    def _no_routing(row: pd.Series | None) -> str:
        """Why a trial has no `routing` rows, for the page."""
        source = row.get("data.source") if row is not None else None
        if isinstance(source, str) and source != "synthetic":  # NaN: a store without the config column
            return (f"No expert-vs-domain routing: it needs data with known domains (data.source synthetic); "
                    f"this run's source is {source!r}.")
        return ("No expert-vs-domain routing for this trial: the `routing` table has no rows for it (it is "
                "written for MoE runs on the synthetic source; this run has not logged any yet, or predates it).")

    def experts(self, sweep: str, trials: pd.DataFrame, trial: str, step: int | None = None, layer: int = 0):
        """(load heatmap, load-over-time heatmap, domain routing heatmap, specialisation figure, imbalance
        figure, notes, expert rows)."""
        e, used, mat, over, imb, m = self.experts_data(sweep, trial, step, layer)
        r, r_used, share, spec = self.routing_data(sweep, trial, step, layer)
        notes = []
        if not len(e):
            notes.append("This trial has no rows in the `experts` table (not recorded yet, or a dense run).")
        layers = sorted(e["layer"].unique()) if len(e) else []
        if len(e) and int(layer or 0) not in layers:
            notes.append(f"Layer {layer} is not recorded; layers: {layers[0]}..{layers[-1]}.")
        rows = trials[trials["trial_id"] == trial]
        if len(r):
            domain_fig = F.domain_heatmap(share, r_used, int(layer or 0), trial)
            spec_fig = F.specialisation_figure(spec)
        else:
            msg = self._no_routing(rows.iloc[0] if len(rows) else None)
            notes.append(msg)
            domain_fig, spec_fig = F.message_figure(msg), F.message_figure("")
        return (F.expert_heatmap(mat, used, trial), F.expert_time_heatmap(over, int(layer or 0)), domain_fig,
                spec_fig, F.imbalance_figure(imb, m), " ".join(notes), e)

    def parallel(self, sweep: str, trials: pd.DataFrame, metric: str = "final_loss"):
        if metric == "leverage":
            trials, _ = self.with_leverage(sweep, trials)
        frame = parallel_frame(trials, metric)
        return F.parallel_figure(frame, axis_keys(trials), metric), frame
