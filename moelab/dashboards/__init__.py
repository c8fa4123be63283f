"""The results dashboard (design.md "dashboards/"): reads the store, never writes it.

* `moelab.dashboards.inputs`: every check a request meets before the store is read (names, URL state,
  Host header, request size, credentials kept out of pages).
* `moelab.dashboards.reader`: cached, read-only reading of the store.
* `moelab.dashboards.trials`, `.curves`, `.effects`, `.scaling`, `.experts`: pure functions from the store's
  rows to what each view needs (filter, group, seed aggregation, M4 downsampling, effects, leverage, expert
  load); no web stack. `moelab.dashboards.query` re-exports them and the reader under one name.
* `moelab.dashboards.figures`: Plotly figures from those frames (also for notebooks).
* `moelab.dashboards.views`, `.layout`, `.callbacks`, `.app`: the Dash app, `create_app(root)` and
  `serve(root, host="127.0.0.1", port=8050)`.

`serve` and `create_app` are importable from here; Dash is imported only when they are used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moelab.dashboards import app

        return getattr(app, name)
    raise AttributeError(f"module 'moelab.dashboards' has no attribute {name!r}")
