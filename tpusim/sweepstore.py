"""A sweep's table of results: rewritten atomically as rows arrive, read back to resume (see
:mod:`tpusim.sweep`). Parquet or CSV by the output's suffix."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tpusim.errors import TpusimError
from tpusim.timeline import write_atomic, write_parquet

def rows_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows ordered by configuration index; columns in the order they first appear; integer columns
    with missing values (e.g. ``chips`` of an invalid row) stay integers."""
    rows = sorted(rows, key=lambda r: r["index"])
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype == float and all(isinstance(r[col], int) for r in rows if col in r):
            df[col] = df[col].astype("Int64")
    return df


def row_dicts(df: pd.DataFrame) -> list[dict]:
    """A frame's rows as dicts without their missing values (as a fresh row lacks them)."""
    return [{k: v for k, v in r.items() if not pd.isna(v)} for r in df.to_dict("records")]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a sweep's output file, to resume from."""
    path = Path(path)
    try:
        df = (pd.read_parquet(path) if path.suffix == ".parquet" else
              pd.read_csv(path, engine="python", dtype_backend="numpy_nullable"))  # exact floats
    except Exception as e:  # noqa: BLE001 - any unreadable file: say so, never overwrite it
        raise TpusimError(f"cannot read it to resume ({type(e).__name__}: {e}); move it away or choose another "
                          "--out", source=str(path)) from None
    if "config" not in df.columns or "index" not in df.columns:
        raise TpusimError("not a tpusim sweep output (no config column); choose another --out", source=str(path))
    if "reason" in df.columns:
        df["reason"] = df["reason"].fillna("")  # CSV reads "" back as missing
    return row_dicts(df)


def write_rows(rows: Iterable[dict], path: str | Path) -> None:
    """Write the table (Parquet or CSV by suffix) whole or not at all (a temporary file renamed)."""
    path = Path(path)
    df = _arrow_safe(rows_frame(rows))
    if path.suffix == ".parquet":
        write_parquet(df, path)
    else:
        write_atomic(path, df.to_csv(index=False).encode())


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A column mixing value types (``--vary KEY=1,auto``), which Parquet cannot store, becomes text
    (JSON for the non-strings)."""
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                df[col] = [v if isinstance(v, str) or v is None else json.dumps(v) for v in df[col]]
    return df


def check_out(path: str | Path) -> Path:
    """An output file that can be written: .parquet or .csv, in a folder that exists."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise TpusimError(f"write .parquet or .csv, not {path.suffix or 'no suffix'}", source=f"--out {path}")
    if not path.parent.is_dir():
        raise TpusimError("its folder does not exist", source=f"--out {path}")
    return path
