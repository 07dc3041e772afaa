"""Sweeps: one simulated step per point of a grid of workload settings, one row per point.

A sweep is a workload, a topology and ``vary``: MaxText flat keys (or ``topology``, ``slices``,
``mode``) each with a list of values. A serving workload (one with a ``serving`` section) is served
per configuration instead (:mod:`tpusim.explore.servesweep`), through the same grid and journal. :func:`run_sweep` runs the cartesian product, in order, and
returns (and writes, as configurations finish) one row per configuration::

    index, config, <one column per varied key>, status, reason, <every field of tpusim run --json>

``status`` is ``ok``, ``infeasible`` (does not fit in HBM), ``invalid`` (the configuration is wrong:
``reason`` says why) or ``error`` (a bug in tpusim; redone on resume). ``config`` is the canonical
JSON of every input (workload name, topology, slices, mode and the varied values). Each row is
appended to a journal beside the output as it finishes (:mod:`tpusim.explore.store`); a sweep run again
with the same output skips the configurations already in the journal, so an interrupted or killed
sweep resumes, loses no finished row and computes none twice. An output whose rows are of another
grid (other keys, other fixed settings, values this grid does not have) is refused, not merged.
Summary mappings with fixed keys (``utilization``, ``memory``) become ``parent.key`` columns; the
other nested fields become JSON strings.

The grid is streamed: configurations are made one by one (itertools.product), never as a list.
They run in local worker processes (every core), serially (``workers=1``), or as Ray tasks
(:mod:`tpusim.explore.workers`); the simulator is deterministic, so the rows are the same whichever
way they ran, except ``sim_wall_s`` (the wall time of the simulation).

>>> parse_vary(["per_device_batch_size=1,0.5", "remat_policy=full,minimal"])
{'per_device_batch_size': (1, 0.5), 'remat_policy': ('full', 'minimal')}
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tpusim.config import read_yaml
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.explore.store import (  # noqa: F401  (re-exported)
    SweepOutput,
    check_out,
    journal_path,
    read_journal,
    read_rows,
    row_dicts,
    rows_frame,
    write_rows,
)
from tpusim.explore.servesweep import check_serving_vary, is_serving_workload, serving_columns_of
from tpusim.explore.workers import iter_rows  # re-exported (search uses it)

MAX_GRID = 2000  # configurations a sweep runs without --yes
SWEEP_KEYS = ("topology", "slices", "mode")  # varied by the sweep itself, not keys of the workload
FLAT_DICTS = ("utilization", "memory")  # summary mappings with fixed keys: one column per key
MODES = ("calibrated", "datasheet")
_SWEEP_FILE_KEYS = ("workload", "topology", "topologies", "slices", "mode", "vary")


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """One configuration to simulate: the workload's mapping plus the varied values (``inputs``)."""

    index: int
    key: str
    raw: dict
    source: str
    topology: str | None
    slices: int | None
    mode: str
    inputs: dict
    exact: bool = False  # simulate every training step whole (never extrapolated in its layers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    """A grid: the workload (its file's mapping), fixed settings and the values of each varied key."""

    workload: str
    raw: dict
    topology: str | None = None
    slices: int | None = None
    mode: str = "calibrated"
    vary: dict[str, tuple] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    exact: bool = False  # every step simulated whole: rows equal to tpusim run's to the last digit

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.vary.values())

    def context(self) -> dict:
        """The fixed inputs every configuration's key includes."""
        name = self.raw.get("name") or Path(self.workload).stem
        return {"workload": name, "topology": self.topology, "slices": self.slices, "mode": self.mode}

    def tasks(self) -> Iterator[Task]:
        """The configurations in order, made as they are asked for (a grid can have 10^8)."""
        keys = list(self.vary)
        context = self.context()
        for i, combo in enumerate(itertools.product(*self.vary.values())):
            inputs = dict(zip(keys, combo, strict=True))
            yield Task(index=i, key=config_key({**context, **inputs}), raw=self.raw, source=self.workload,
                       topology=self.topology, slices=self.slices, mode=self.mode, inputs=inputs, exact=self.exact)

    def indexer(self) -> Callable[[str], int]:
        """A configuration's key -> its index in the grid, by arithmetic (no enumeration); ValueError
        saying what differs for a key that is not one of this grid's."""
        context = self.context()
        fixed = {k: config_key(v) for k, v in context.items() if k not in self.vary}
        where = {k: {config_key(v): i for i, v in enumerate(values)} for k, values in self.vary.items()}
        strides = {k: math.prod(len(v) for v in list(self.vary.values())[n + 1:]) for n, k in enumerate(self.vary)}
        expected = set(fixed) | set(self.vary)

        def index(key: str) -> int:
            try:
                inputs = json.loads(key)
            except ValueError:
                inputs = None
            if not isinstance(inputs, dict):
                raise ValueError(f"{key!r} is not a configuration")
            if set(inputs) != expected:
                raise ValueError(f"its rows have the keys {', '.join(sorted(inputs))}; this sweep's have "
                                 f"{', '.join(sorted(expected))}")
            for k, text in fixed.items():
                if config_key(inputs[k]) != text:
                    raise ValueError(f"its rows have {k} {inputs[k]!r}; this sweep has {context[k]!r}")
            i = 0
            for k, positions in where.items():
                if config_key(inputs[k]) not in positions:
                    raise ValueError(f"its rows have {k} {inputs[k]!r}, not one of this sweep's values")
                i += positions[config_key(inputs[k])] * strides[k]
            return i

        return index


def config_key(inputs: dict) -> str:
    """The canonical JSON of a configuration's inputs: what resuming matches rows by."""
    return json.dumps(inputs, sort_keys=True, separators=(",", ":"))


def parse_value(text: str, *, source: str = "--vary") -> Any:
    """A YAML scalar: ``2`` -> 2, ``0.5`` -> 0.5, ``full`` -> 'full', ``true`` -> True."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise TpusimError(f"{text!r} is not a YAML scalar", source=source) from None
    if value is None or isinstance(value, (list, dict)):
        raise TpusimError(f"{text!r} is not a single value (a number or a word)", source=source)
    return value


def parse_vary(items: Iterable[str], *, source: str = "--vary") -> dict[str, tuple]:
    """``KEY=V1,V2,...`` options -> {key: values}; malformed, empty or repeated keys are errors."""
    vary: dict[str, tuple] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise TpusimError(f"{item!r} is not KEY=V1,V2,... (e.g. per_device_batch_size=1,2)", source=source)
        if key in vary:
            raise TpusimError(f"{key} is given twice; list all its values in one KEY=V1,V2", source=source)
        parts = [p.strip() for p in values.split(",")]
        if not values.strip() or any(not p for p in parts):
            raise TpusimError(f"{key} has an empty value in {item!r}; give one or more values", source=source)
        vary[key] = tuple(parse_value(p, source=f"{source} {key}") for p in parts)
    return vary


def read_sweep_file(path: str | Path) -> dict | None:
    """A sweep file's settings: ``workload`` (relative to the file), ``topology``, ``topologies`` (a list
    to vary), ``slices``, ``mode`` and ``vary`` (key -> list of values); None if ``path`` has no ``vary:``
    (it is then a workload)."""
    from tpusim.config import check_keys

    raw = read_yaml(path)
    if not isinstance(raw, dict) or "vary" not in raw:
        return None
    src = str(path)
    check_keys(raw, _SWEEP_FILE_KEYS, source=src, prefix="")
    if "workload" not in raw:
        raise TpusimError("required key is missing", source=src, key="workload")
    vary = raw.get("vary") or {}
    if not isinstance(vary, dict):
        raise TpusimError("expected a mapping of key -> list of values", source=src, key="vary")
    out = {"workload": os.path.normpath(Path(path).parent / str(raw["workload"])), "vary": {}}
    for key in ("topology", "slices", "mode"):
        if key in raw:
            out[key] = raw[key]
    if "topologies" in raw:
        if "topology" in vary:
            raise TpusimError("give topologies or vary.topology, not both", source=src, key="topologies")
        vary = {"topology": raw["topologies"], **vary}
    for key, values in vary.items():
        values = values if isinstance(values, list) else [values]
        if not values or any(v is None or isinstance(v, (list, dict)) for v in values):
            raise TpusimError("expected a non-empty list of values", source=src, key=f"vary.{key}")
        out["vary"][str(key)] = tuple(values)
    return out


def make_sweep(workload: str | Path, vary: dict[str, tuple], *, topology: str | None = None,
               slices: int | None = None, mode: str = "calibrated", limit: int = MAX_GRID,
               yes: bool = False, exact: bool = False) -> Sweep:
    """Check a grid before running it: every varied key is one the workload has (the loader's unknown-key
    error), no value list is empty, ``mode`` values exist, and the grid has at most ``limit``
    configurations unless ``yes``."""
    from tpusim.model.workload import workload_from_dict

    source = str(workload)
    raw = read_yaml(workload)
    if not isinstance(raw, dict):
        raise TpusimError("a workload is a mapping of keys to values", source=source)
    if not vary:
        raise TpusimError("nothing to vary: give --vary KEY=V1,V2,...", source="tpusim sweep")
    warnings = []
    serving = is_serving_workload(raw)  # served, not stepped: tpusim.explore.servesweep
    for key, values in vary.items():
        if not values:
            raise TpusimError(f"{key} has no values", source="--vary")
        seen = [config_key(v) for v in values]
        if len(set(seen)) < len(seen):
            twice = next(v for v in values if seen.count(config_key(v)) > 1)
            raise TpusimError(f"{key} lists {twice!r} twice; give each value once", source="--vary")
        if key == "mode" and any(v not in MODES for v in values):
            raise TpusimError(f"mode values are {' or '.join(MODES)}; got {list(values)}", source="--vary")
        if key in SWEEP_KEYS or serving:
            continue
        try:
            w = workload_from_dict(raw, source=source, overrides={key: values[0]})
        except TpusimError as e:
            if e.key == key and e.reason.startswith("unknown key"):
                raise TpusimError(f"{key}: {e.reason}: {source} has no such key", source="--vary") from None
            continue  # a bad value is a row that says why, not a refused sweep
        if key in w.ignored_keys:
            warnings.append(f"{key} does not change performance: its rows will be the same")
    if serving:
        warnings += check_serving_vary(raw, source, vary, SWEEP_KEYS)
    sweep = Sweep(workload=source, raw=raw, topology=topology, slices=slices, mode=mode, vary=dict(vary),
                  warnings=tuple(warnings), exact=exact)
    if sweep.size > limit and not yes:
        raise TpusimError(f"the grid has {sweep.size:,} configurations, more than {limit:,}: pass --yes to run "
                          "them all, or vary fewer values", source="tpusim sweep")
    return sweep


def summary_columns(summary: dict) -> dict:
    """``tpusim run --json``'s fields as flat columns (see the module docstring)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if k in FLAT_DICTS and isinstance(v, dict):
            out.update({f"{k}.{sub}": x for sub, x in v.items()})
        elif isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v)
        else:
            out[k] = v
    return out


def run_task(task: Task) -> dict:
    """Simulate (or, for a serving workload, serve) one configuration; the row says ``ok`` with every
    field of the command's ``--json``, or why not (never raises for a bad configuration)."""
    row: dict[str, Any] = {"index": task.index, "config": task.key, **task.inputs}
    overrides = {k: v for k, v in task.inputs.items() if k not in SWEEP_KEYS}
    topology = task.inputs.get("topology", task.topology)
    topology = None if topology is None else str(topology)
    slices = task.inputs.get("slices", task.slices)
    mode = task.inputs.get("mode", task.mode)
    evaluate = serving_columns_of if is_serving_workload(task.raw) else _training_columns
    try:
        columns = evaluate(task, overrides, topology, slices, mode)
    except InfeasibleError as e:
        row.update(status="infeasible", reason=e.message)
    except TpusimError as e:
        row.update(status="invalid", reason=e.message)
    except Exception as e:  # noqa: BLE001 - one bug must not end a 2,000-configuration sweep
        row.update(status="error", reason=f"internal error (please report): {type(e).__name__}: {e}")
    else:
        row.update(status="ok", reason="")
        for k, v in columns.items():
            row.setdefault(k, v)  # a varied `topology` or `mode` keeps the user's spelling
    return row


def _training_columns(task: Task, overrides: dict, topology: str | None, slices, mode: str) -> dict:
    """``tpusim run --json``'s fields for one training configuration, flat (to float rounding: the
    step is extrapolated from three short ones where its layers repeat, :mod:`tpusim.explore.periodic`;
    ``task.exact``: simulated whole, to the last digit)."""
    from tpusim.analysis.summary import summarize
    from tpusim.api import workload_and_topology
    from tpusim.compiler import compile_program
    from tpusim.explore.periodic import summarize_step
    from tpusim.model.workload import workload_from_dict
    from tpusim.sim.engine import simulate

    if slices is not None and (not isinstance(slices, int) or isinstance(slices, bool) or slices < 1):
        raise TpusimError(f"{slices!r} is not a positive number of slices", source="slices")
    w = workload_from_dict(task.raw, source=task.source, overrides=overrides)
    _, topo = workload_and_topology(w, topology, slices=slices)
    if task.exact:
        return summary_columns(summarize(simulate(compile_program(w, topo), topo, mode=mode)))
    return summary_columns(summarize_step(w, topo, mode=mode))


@dataclass(slots=True, kw_only=True)
class SweepRun:
    """What :func:`run_sweep` did: every row (resumed and new, ordered) and how many it simulated."""

    rows: pd.DataFrame
    total: int
    resumed: int
    simulated: int
    wall_s: float


def run_sweep(sweep: Sweep, *, out: str | Path | None = None, workers: int | None = None, ray: str | None = None,
              progress: Callable[[int, int], None] | None = None, on_row: Callable[[dict], None] | None = None,
              stop: Callable[[], bool] | None = None, flush_s: float = 5.0) -> SweepRun:
    """Run every configuration of ``sweep`` not already in ``out``'s journal (rows with ``status: error``
    are redone).

    Each row is journaled as it finishes; the table ``out`` is rewritten from the rows every ``flush_s``
    seconds (less often when the table is large: at most ~5% of the time goes to it), and at the end,
    however the sweep ends. ``stop()`` turning true stops it gracefully (see :mod:`tpusim.explore.workers`).
    ``progress(done, todo)`` and ``on_row(row)`` are called in this process as rows arrive. Rows in
    ``out`` that are not of this grid are an error (the output belongs to another sweep).
    """
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    store = None if out is None else SweepOutput(out, check=lambda done: rows.update(_resumed_rows(sweep, out, done)))
    try:
        resumed = len(rows)
        todo = sweep.size - resumed
        tasks = (t for t in sweep.tasks() if t.key not in rows)  # the skip set, checked per task
        last, every_s, simulated = time.perf_counter(), flush_s, 0
        finished = False
        try:
            for simulated, row in enumerate(iter_rows(tasks, workers=workers, ray=ray,
                                                      journal=store and store.journal, stop=stop), start=1):
                rows[row["config"]] = row
                if on_row is not None:
                    on_row(row)
                if progress is not None:
                    progress(simulated, todo)
                if store is not None and time.perf_counter() - last >= every_s:
                    began = time.perf_counter()
                    write_rows(rows.values(), out)
                    last = time.perf_counter()
                    every_s = max(flush_s, 20 * (last - began))  # a big table: rewrite it less often
            finished = True
        finally:
            if store is not None:
                if not finished:  # rows a worker journaled but had not handed over when interrupted
                    rows = {**_resumed_rows(sweep, out, read_journal(store.journal_path)), **rows}
                if rows:
                    write_rows(rows.values(), out)
    finally:
        if store is not None:
            store.close()
    return SweepRun(rows=rows_frame(rows.values()), total=sweep.size, resumed=resumed, simulated=simulated,
                    wall_s=time.perf_counter() - t0)


def _resumed_rows(sweep: Sweep, out: str | Path, journaled: list[dict]) -> dict[str, dict]:
    """The journal's rows by configuration, checked against the grid and indexed by it, errors left out."""
    index = sweep.indexer()
    rows: dict[str, dict] = {}
    for row in journaled:
        try:
            i = index(row["config"])
        except ValueError as e:
            raise TpusimError(f"holds rows of another sweep: {e} (e.g. {row['config']}); move it and "
                              f"{journal_path(out).name} away, or choose another --out", source=str(out)) from None
        if row.get("status") == "error":
            rows.pop(row["config"], None)
        else:
            rows[row["config"]] = {**row, "index": i}
    return rows


# ---- speed: python -m tpusim.explore.sweep --bench -------------------------------------------------------------

BENCH_GRIDS = {  # v5e:16x16, fsdp_70b.yaml with these keys fixed, x tensor 1-8 x sequence length 1k-4k
    "fsdp_70b: LLaMA-3 70B, 80 layers (5-6k ops)": {},
    "LLaMA-3 8B, 32 layers (2-3k ops)": {"model_name": ("llama3-8b",)},
    "LLaMA-3 70B dims, 16 layers (1-1.5k ops)": {"base_num_decoder_layers": (16,)},
}


def main(argv: list[str] | None = None) -> None:
    """``python -m tpusim.explore.sweep --bench [--workers N]``: configurations per second, 16 per grid, on v5e:16x16."""
    import argparse

    from tpusim.data import data_dir

    parser = argparse.ArgumentParser(description="sweep speed: configurations per second on this machine")
    parser.add_argument("--bench", action="store_true", required=True, help="run the benchmark")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: every core)")
    args = parser.parse_args(argv)
    print(f"| grid on v5e:16x16 ({args.workers} worker processes) | configurations | simulated | configurations/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, fixed in BENCH_GRIDS.items():
        vary = {**fixed, "ici_tensor_parallelism": (1, 2, 4, 8), "max_target_length": (1024, 2048, 3072, 4096)}
        sweep = make_sweep(data_dir("workloads") / "fsdp_70b.yaml", vary, topology="v5e:16x16")
        run = min((run_sweep(sweep, workers=args.workers) for _ in range(2)), key=lambda r: r.wall_s)
        ok = int((run.rows["status"] == "ok").sum())
        print(f"| {name} | {run.total} | {ok} ok | {run.total / run.wall_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
