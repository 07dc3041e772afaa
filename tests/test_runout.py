"""``run --out`` writes the bytes it wrote before it stopped importing pandas (issue 13).

The writers now take the timeline as column lists (``timeline_columns``), write the Parquet file
with pyarrow alone, the Chrome trace's JSON as text and the XSpace's op metadata in protobuf's wire
format. Two checks that every file is unchanged:

* ``tests/data/runout_sha256.json``: the SHA-256 of every file ``tpusim run --out`` wrote for four
  runs with the writers before the change (commit 9a567eb: ``timeline_frame`` in pandas,
  ``DataFrame.to_parquet``), made by ``python tests/test_runout.py --record`` in a checkout of that
  commit, with the library versions it lists. (Re-recorded when the model changed what is simulated:
  that commit's writers with the later model files, the ones ``made_by`` names, copied over it.) The trace (JSON + gzip), the XSpace (protobuf), the
  summary and the report do not depend on pandas or pyarrow; the Parquet file names the pyarrow and
  pandas versions that wrote it, so its hash (and the manifest, which holds its size) is compared
  where those versions are the recorded ones, and
* everywhere, the Parquet bytes against what pandas writes from the DataFrame that code built (its
  ``timeline_frame``, copied below as the reference), on the same simulated step.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "runout_sha256.json"
CASES = {  # name -> tpusim run arguments (relative to the repository)
    "fsdp_70b_16x16": ["workloads/fsdp_70b.yaml", "--topology", "16x16"],  # the command
    "mixtral_straggler": ["workloads/mixtral_8x7b_ep.yaml", "--straggler", "5=1.1"],  # two device classes
    "llama3_8b_all_devices": ["workloads/llama3_8b_fsdp_tp.yaml", "--topology", "v5p:2x2x2", "--all-devices"],
    "hlo_fsdp_tp": ["--hlo", "traces/xla_aot/fsdp_tp_L2/optimized_hlo.txt.gz", "--topology", "v5p:2x2x2"],
}
VERSIONED = {"timeline.parquet", "manifest.json"}  # bytes that name pyarrow's and pandas' versions


def _versions() -> dict[str, str]:
    import zlib

    import google.protobuf
    import pandas
    import pyarrow

    return {"pyarrow": pyarrow.__version__, "pandas": pandas.__version__, "protobuf": google.protobuf.__version__,
            "zlib": zlib.ZLIB_RUNTIME_VERSION}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_out_writes_the_files_it_wrote_with_pandas(case, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tpusim.cli import main

    golden = json.loads(GOLDEN.read_text())
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(main, ["run", *CASES[case], "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    got, want = _hashes(tmp_path / "run"), golden["runs"][case]
    assert set(got) == set(want)
    same_versions = _versions()["pyarrow"] == golden["versions"]["pyarrow"] and \
        _versions()["pandas"] == golden["versions"]["pandas"]
    for name in sorted(want):
        if name not in VERSIONED or same_versions:
            assert got[name] == want[name], f"{case}: {name} differs from what the code before issue 13 wrote"


def _frame_as_before(result, *, all_devices: bool = False):
    """``timeline_frame`` as it was (commit 9a567eb), in pandas: the reference for the column lists."""
    import pandas as pd

    from tpusim.analysis.timeline import COLUMNS

    rec = result.record
    base = pd.DataFrame({
        "device_class": rec.device_class, "stream": rec.stream, "name": rec.name, "category": rec.category,
        "layer": rec.layer, "phase": rec.phase, "start_s": rec.start_s, "end_s": rec.end_s,
        "flops": rec.flops, "bytes": rec.bytes, "op_index": rec.op_index,
    })
    frames = []
    for c, cls in enumerate(result.classes):
        rows = base[(base.device_class == c) | (base.device_class == -1)]
        devices = cls["devices"] if all_devices else cls["devices"][:1]
        for d in devices:
            frames.append(rows.assign(device=d, replicas=1 if all_devices else len(cls["devices"])))
    df = pd.concat(frames, ignore_index=True) if frames else base.assign(device=0, replicas=1)
    df = df[COLUMNS].astype({"device": "int32", "layer": "int32", "replicas": "int32", "op_index": "int32"})
    return df.sort_values(["device", "start_s", "op_index"], kind="stable").reset_index(drop=True)


def _simulate(args: list[str]):
    """The SimResult and --all-devices of a case's arguments, as `tpusim run` makes them."""
    from tpusim.api import compile_workload
    from tpusim.compiler.hlo.importer import import_hlo, read_hlo
    from tpusim.sim.engine import simulate
    from tpusim.sim.topology import parse_topology

    rest = iter(args[1:] if not args[0].startswith("--") else args)
    opts = {a: True if a == "--all-devices" else next(rest) for a in rest}
    if "--hlo" in opts:
        topo = parse_topology(opts["--topology"])
        prog = import_hlo(read_hlo(ROOT / opts["--hlo"]), topo, source=opts["--hlo"])
    else:
        _, topo, prog = compile_workload(ROOT / args[0], opts.get("--topology"))
    slow = {int(d): float(f) for d, f in [opts["--straggler"].split("=")]} if "--straggler" in opts else {}
    return simulate(prog, topo, stragglers=slow), "--all-devices" in opts


@pytest.mark.parametrize("case", sorted(CASES))
def test_timeline_columns_and_parquet_are_the_frame_pandas_wrote(case):
    import pandas as pd

    from tpusim.analysis.timeline import (chrome_trace_json, frame_of, timeline_columns, timeline_frame,
                                          timeline_parquet)

    result, all_devices = _simulate(CASES[case])
    before = _frame_as_before(result, all_devices=all_devices)
    columns = timeline_columns(result, all_devices=all_devices)
    pd.testing.assert_frame_equal(frame_of(columns), before, check_exact=True)
    pd.testing.assert_frame_equal(timeline_frame(result, all_devices=all_devices), before, check_exact=True)
    buf = io.BytesIO()
    before.to_parquet(buf, index=False, engine="pyarrow")  # what write_parquet did
    assert timeline_parquet(columns) == buf.getvalue()
    # The Chrome trace is written as text (chrome_trace_json): what json.dumps writes of what it says
    text = chrome_trace_json(columns, result)
    assert json.dumps(json.loads(text), separators=(",", ":")) == text


def test_with_pandas_2_pandas_writes_the_parquet(monkeypatch):
    """pandas 2 holds strings as objects, and its to_parquet another schema: timeline_parquet lets it
    write the file (the fast path reproduces pandas 3's)."""
    import importlib.metadata

    import pandas as pd

    from tpusim.analysis.timeline import frame_of, timeline_columns, timeline_parquet

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.2.3" if name == "pandas" else real(name))
    result, _ = _simulate(CASES["llama3_8b_all_devices"])
    columns = timeline_columns(result)
    buf = io.BytesIO()
    frame_of(columns).to_parquet(buf, index=False, engine="pyarrow")
    assert timeline_parquet(columns) == buf.getvalue()
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(timeline_parquet(columns))), frame_of(columns))


def test_a_device_in_two_classes_is_merged_as_the_frame_sorted_it():
    """The engine never puts a device in two classes; were it to, the rows would still come out as
    the frame's stable sort left them (by start and op, ties in concatenation order)."""
    import pandas as pd

    from tpusim.analysis.timeline import frame_of, timeline_columns

    result, _ = _simulate(CASES["mixtral_straggler"])
    assert len(result.classes) == 2
    result.classes = [result.classes[0], {**result.classes[1], "devices": result.classes[0]["devices"][:1]}]
    pd.testing.assert_frame_equal(frame_of(timeline_columns(result)), _frame_as_before(result), check_exact=True)


def test_xspace_op_metadata_encoded_is_the_message_of_the_add_calls():
    """The XSpace writer encodes the op metadata of a simulated step itself (``_Plane.op_metadata``, issue 13);
    with ``op_stats`` (a replay's) the same stats go through protobuf's ``add`` calls. Same bytes."""
    from tpusim.analysis.lanes import ns_list
    from tpusim.analysis.timeline import device_rows, timeline_columns
    from tpusim.analysis.xspace import _OP_ORDER, XSpace, _op_stats, _Row, device_plane, program_id, xspace_bytes

    result, _ = _simulate(CASES["mixtral_straggler"])
    columns = timeline_columns(result)
    row = _Row._make(next(zip(*(columns[c] for c in _Row._fields))))
    assert list(_op_stats(row, 1, "m")) == _OP_ORDER
    name, chip = result.program.name, result.topology.chip
    space = XSpace(hostnames=["tpusim"])
    for n, (device, rows) in enumerate(device_rows(columns)):
        device_plane(space, n + 1, int(device), rows, chip=chip, module=f"jit_{name}", pid=program_id(name),
                     step_ns=ns_list([result.step_time_s])[0], op_stats=lambda run, op: None)
    assert space.SerializeToString(deterministic=True) == xspace_bytes(
        columns, chip=chip, program_name=name, step_time_s=result.step_time_s)


def _record(tpusim_root: Path, commit: str) -> None:
    """Write GOLDEN from the tpusim checkout at ``tpusim_root`` (its `python -m tpusim`, run there), the
    code of ``commit``."""
    runs = {}
    for case, args in sorted(CASES.items()):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "tpusim", "run", *args, "--out", f"{tmp}/run"], cwd=tpusim_root,
                           check=True, stdout=subprocess.DEVNULL)
            runs[case] = _hashes(Path(tmp) / "run")
    made_by = (f"python tests/test_runout.py --record CHECKOUT {commit}, CHECKOUT holding tpusim at commit {commit} "
               f"(git archive {commit} | tar -x -C CHECKOUT) with the current model files copied over it (name them)")
    GOLDEN.write_text(json.dumps({"made_by": made_by, "versions": _versions(), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or len(sys.argv) != 4:
        sys.exit("usage: python tests/test_runout.py --record CHECKOUT COMMIT")
    _record(Path(sys.argv[2]).resolve(), sys.argv[3])
