"""A sweep's results on disk (see :mod:`tpusim.explore.sweep`): the journal and the table.

The journal, ``<out>.journal.jsonl`` beside the output, is the truth: one JSON line per finished row,
appended (by whichever process computed the row) and synced to disk before the row counts as finished,
so a sweep killed in any way keeps every row that finished. The table (Parquet or CSV by the output's
suffix) is rewritten from the rows, whole or not at all, now and then and at the end; resuming reads
the journal (an output without one, from an older tpusim, is read once and copied into a new journal).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from tpusim.errors import TpusimError
from tpusim.analysis.timeline import write_atomic, write_parquet

JOURNAL_SUFFIX = ".journal.jsonl"


def journal_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + JOURNAL_SUFFIX)


def _plain(value):
    """numpy scalars as Python numbers (JSON knows no numpy types)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a row value")


def encode_row(row: dict) -> bytes:
    return json.dumps(row, separators=(",", ":"), default=_plain).encode() + b"\n"


def plain_row(row: dict) -> dict:
    """The row as the journal gives it back: a fresh row and a resumed one are then the same values."""
    return json.loads(encode_row(row))


class Journal:
    """Appends rows to a journal. Each row is one ``write`` of one line to a file opened ``O_APPEND``, so
    the lines of several worker processes appending at once stay whole (POSIX appends to a local file
    are atomic; lines are a few kB), then ``fdatasync``: a finished row survives SIGKILL and power loss.
    A sweep appends with ``sync=False`` and syncs once per group of rows before it reports any of them
    (group commit, see :mod:`tpusim.explore.workers`): a written row survives SIGKILL at once, power loss
    once synced."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, row: dict, *, sync: bool = True) -> dict:
        line = encode_row(row)
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]
        if sync:
            self.sync()
        return json.loads(line)

    def sync(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_journal(path: str | Path, *, repair: bool = False) -> list[dict]:
    """A journal's rows in the order they finished. A last line without its newline is a row whose
    process was killed while writing it: it did not finish, so it is dropped (and, with ``repair``,
    cut off the file so the next row starts on a line of its own). Any other unreadable line is an error."""
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("config"), str):
            raise TpusimError(f"line {n} is not a row of a tpusim sweep; move the journal away (the table "
                              "beside it is then read to resume)", source=str(path))
        rows.append(row)
    return rows


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
    # CSV reads an empty reason back as missing (a column of them as numbers): "" again, in its place
    return [{k: "" if k == "reason" and pd.isna(v) else v for k, v in r.items() if k == "reason" or not pd.isna(v)}
            for r in df.to_dict("records")]


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


class SweepOutput:
    """A sweep's output, open to add rows: the journal locked (one sweep writes an output at a time), a
    torn last line cut off, and the rows done so far (``done``, in the order they finished; a later row
    of a configuration replaces an earlier one). ``check(done)`` may refuse them (rows of another
    grid): then nothing is left behind. An older tpusim's table (no journal) is copied into a new one."""

    def __init__(self, out: str | Path, check: Callable[[list[dict]], None] = lambda done: None):
        self.out = Path(out)
        self.journal_path = journal_path(self.out)
        created = not self.journal_path.exists()
        legacy = read_rows(self.out) if created and self.out.exists() else []
        try:
            self.journal = Journal(self.journal_path)
        except OSError as e:
            raise TpusimError(f"cannot write its journal {self.journal_path.name}: {e.strerror or e}",
                              source=f"--out {self.out}") from None
        try:
            try:
                import fcntl

                fcntl.flock(self.journal.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no lock
                pass
            except BlockingIOError:
                created = False  # another sweep's
                raise TpusimError(f"another tpusim sweep is writing it (its journal {self.journal_path.name} is "
                                  "locked); wait for that one to end", source=str(self.out)) from None
            self.done = read_journal(self.journal_path, repair=True) or legacy
            check(self.done)
        except BaseException:
            self.journal.close()
            if created:
                self.journal_path.unlink(missing_ok=True)
            raise
        if legacy and self.journal_path.stat().st_size == 0:
            for row in legacy:
                self.journal.append(row, sync=False)
            self.journal.sync()
        for stale in self.out.parent.glob(f".{self.out.name}.*.tmp"):  # tables being written when killed
            stale.unlink(missing_ok=True)

    def close(self) -> None:
        self.journal.close()
