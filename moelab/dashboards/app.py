"""The results dashboard: a Dash app over one results store, read-only.

    from moelab.dashboards.app import serve
    serve("results/")                       # http://127.0.0.1:8050, `moelab dashboard results/`

Views (tabs): sweeps overview, runs table, curves, axis effects, scaling & leverage, experts, parallel
coordinates. The page URL holds the state (`?view=curves&sweep=noise&metric=loss&x=tokens&log=x,y&group=family`),
so a view can be shared; unknown or malformed parameters fall back to defaults. Parameters: view, sweep,
status and family (comma lists, "none" = empty), metric, x (step / tokens / flops / wall_s), log (x,y), smooth
(EMA weight), group ("seeds" = mean over seeds [default], "none", or comma-joined config keys), axis, baseline,
split, emetric (effects metric), color and budget (scaling: the colour key, and the training FLOPs of the
efficiency-leverage surface), trial, step, layer (experts: the layer whose load over time and domain routing
are shown), pmetric (parallel coordinates), differ=0 (all config columns), refresh=0 (no auto-refresh).
Every table has a CSV button; every figure a PNG button (Plotly's mode bar).
While the page is open it re-reads the store every `refresh_s` seconds (only files that changed are read,
and a view is redrawn only when its sweep's files changed).

Modules, each with one job (imports flow one way: inputs, reader <- trials, curves, effects, scaling, experts
<- figures <- views <- layout <- callbacks <- app):

* `inputs`: every check a request meets (Host header, body size, URL state, sweep / trial / metric / axis
  names, the store URI shown without credentials);
* `reader`: the cached, read-only store reader; `trials`, `curves`, `effects`, `scaling`, `experts`: the
  frames each view needs (pure functions; `query` re-exports them under their old names);
* `figures`: Plotly figures of those frames; `views`: what each view shows (`Views`);
* `layout`: the page; `callbacks`: what the URL, the controls and the timer change;
* this module: `create_app` and `serve`, which wire them. A callback that fails shows a one-line message in
  its view, never a traceback (the traceback goes to the server log).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

import dash

from moelab.dashboards.callbacks import register
from moelab.dashboards.inputs import (LOOPBACK_HOSTS, MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S, VIEWS, RefusedInput,
                                      checked, encode_state, guard_requests, parse_state, shown_uri)
from moelab.dashboards.layout import page
from moelab.dashboards.reader import Reader
from moelab.dashboards.trials import latest_sweep
from moelab.dashboards.views import Views

# Views, VIEWS, the gate and the URL state are imported from here by the tests, the benchmark and older code.
__all__ = ["create_app", "serve", "Views", "VIEWS", "RefusedInput", "checked", "LOOPBACK_HOSTS",
           "MAX_REQUEST_BYTES", "parse_state", "encode_state"]

log = logging.getLogger("moelab.dashboards")


def create_app(root: str | os.PathLike, *, refresh_s: float = 10.0, prewarm: bool = True,
               title: str = "moelab results", allowed_hosts: Iterable[str] = (),
               request_timeout_s: float = REQUEST_TIMEOUT_S) -> dash.Dash:
    """A Dash app showing the store under `root` (a directory or a pyarrow.fs URI). The root need not exist
    yet: the page says so and picks it up on a later refresh. `prewarm` reads the trials and the newest
    sweep's loss curves in a background thread so the first page load is fast.

    Requests whose Host header names neither a loopback name nor one of `allowed_hosts` ("*": any) get 403,
    and request bodies over MAX_REQUEST_BYTES get 413; a view that takes longer than `request_timeout_s` to
    compute answers with a message instead."""
    reader = Reader(root)
    app = dash.Dash(__name__, title=title, update_title=None, suppress_callback_exceptions=False)
    app.reader = reader  # for tests and notebooks
    guard_requests(app.server, allowed_hosts)
    views = Views(reader)
    app.views = views
    app.layout = page(title, reader.display_uri, refresh_s)
    register(app, reader, views, refresh_s, request_timeout_s)
    if prewarm:
        threading.Thread(target=_prewarm, args=(reader,), daemon=True, name="dashboard-prewarm").start()
    return app


def _prewarm(reader: Reader) -> None:
    """Read the trials and the newest sweep's losses and x axes once, so the first page views are fast."""
    try:
        trials = reader.trials()
        if not len(trials):
            return
        newest = latest_sweep(trials) or trials["sweep"].iloc[0]
        ids = list(trials.loc[trials["sweep"] == newest, "trial_id"])
        reader.metrics(newest, ids, ["loss", "eval_loss", "tokens", "flops", "wall_s"])
    except Exception:  # noqa: BLE001 - best effort; the page reports problems itself
        log.debug("dashboard prewarm failed", exc_info=True)


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 8050, *, refresh_s: float = 10.0,
          debug: bool = False, allowed_hosts: Iterable[str] = ()) -> None:
    """Serve the dashboard of the store under `root` until interrupted (Ctrl-C). Binds `host`:`port`
    (loopback by default: pass host="0.0.0.0" to expose it; there is no authentication). Requests must name
    a loopback host, `host` itself, or one of `allowed_hosts` ("*": any) in their Host header."""
    app = create_app(root, refresh_s=refresh_s, allowed_hosts=[host, *allowed_hosts])
    if host not in LOOPBACK_HOSTS:
        log.warning("dashboard: serving on %s:%s without authentication; anyone who can reach it can read the "
                    "results", host, port)
    print(f"moelab dashboard: {shown_uri(root)} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    app.run(host=host, port=port, debug=debug)
