"""DuckDB over in-memory frames: the heavier aggregations (downsampling, seed means, expert load over
time) are SQL over Arrow tables or DataFrames, each on a fresh in-memory connection."""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd

__all__ = ["sql"]


def sql(query: str, **tables: Any) -> pd.DataFrame:
    """Run `query` on a fresh in-memory DuckDB connection with `tables` registered under their names."""
    con = duckdb.connect()
    try:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(query).df()
    finally:
        con.close()
