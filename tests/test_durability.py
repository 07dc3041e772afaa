"""Nothing lost, nothing redone, nothing mixed: sweeps and run folders under real signals (SIGINT,
SIGTERM, SIGKILL to real `python -m tpusim` processes), resume, and hostile resume inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.errors import TpusimError
from tpusim.runfolder import check_run_folder
from tpusim.explore.sweep import journal_path, make_sweep, read_journal, run_sweep

# LLaMA-3 8B widths, 2 layers, on a v5e 4x4: ~40 ms a configuration.
SMALL = {"name": "small", "chip": "v5e", "topology": "v5e:4x4",
         "model": {"model_name": "llama3-8b", "base_num_decoder_layers": 2},
         "step": {"per_device_batch_size": 1, "max_target_length": 1024},
         "sharding": {"ici_fsdp_parallelism": -1}}
LENGTHS = tuple(range(256, 5121, 256))  # x 2 remat policies: 40 configurations, a few seconds on 2 workers
VARY = ["--vary", "max_target_length=" + ",".join(map(str, LENGTHS)), "--vary", "remat_policy=full,none"]
WALL = ["sim_wall_s"]  # the only column that is not deterministic
TIMEOUT_S = 120  # generous: the machine may be busy; nothing here is a timing assertion


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.fixture(scope="module")
def reference(small):
    """The rows of an uninterrupted sweep of the grid, computed in this process."""
    sweep = make_sweep(small, {"max_target_length": LENGTHS, "remat_policy": ("full", "none")})
    return run_sweep(sweep, workers=1).rows.drop(columns=WALL)


def _tpusim(*args: str, **kw) -> subprocess.Popen:
    """``python -m tpusim ARGS`` in a session (process group) of its own."""
    return subprocess.Popen([sys.executable, "-m", "tpusim", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for(predicate, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < TIMEOUT_S, f"timed out waiting for {what}"
        time.sleep(0.02)


def _no_survivors(pgid: int) -> None:
    t0 = time.monotonic()
    while _group(pgid) and time.monotonic() - t0 < 5:  # a killed parent's workers die asynchronously
        time.sleep(0.05)
    assert _group(pgid) == [], "processes of the sweep survived it"


KILLS = {  # how the sweep is stopped: signals, sent to the parent or (as a terminal or a service manager
    # does) to its whole process group, and its exit status
    "SIGINT to the group (Ctrl-C)": ([signal.SIGINT], True, 130),
    "SIGTERM to the parent": ([signal.SIGTERM], False, 143),
    "SIGTERM to the group": ([signal.SIGTERM], True, 143),
    "SIGINT twice (stop now)": ([signal.SIGINT, signal.SIGINT], True, 130),
    "SIGKILL to the parent": ([signal.SIGKILL], False, -9),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", KILLS)
def test_sweep_loses_nothing_and_redoes_nothing_under_signals(small, reference, tmp_path, how):
    signals, to_group, status = KILLS[how]
    out = tmp_path / "rows.parquet"
    journal = journal_path(out)
    cmd = ["sweep", str(small), *VARY, "--out", str(out), "--workers", "2"]
    proc = _tpusim(*cmd)
    _wait_for(lambda: _lines(journal) >= 4 or proc.poll() is not None, "the first rows")
    assert proc.poll() is None, f"the sweep ended before any signal: {proc.communicate()[1][-500:]}"
    workers = [p for p in _group(proc.pid) if p != proc.pid]
    finished = {r["config"] for r in read_journal(journal)}  # reported finished before the signal
    for sig in signals:
        try:
            (os.killpg if to_group else os.kill)(proc.pid, sig)
        except ProcessLookupError:  # the first signal already ended it
            pass
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == status, err
    if status > 0:
        assert "run the same command again to resume" in err and "Traceback" not in err
    _no_survivors(proc.pid)
    assert len(workers) == 2 and not set(workers) & set(_group(proc.pid))
    saved = {r["config"] for r in read_journal(journal)}
    assert finished <= saved
    assert len(saved) < len(reference), "the sweep ended before the signal: make the grid longer"
    if status > 0:  # the table was written on the way out, from every journaled row
        assert set(pd.read_parquet(out)["config"]) == saved
    resume = CliRunner().invoke(main, [*cmd, "--json"])  # in this process: no second start-up
    assert resume.exit_code == 0, resume.output
    assert json.loads(resume.stdout)["resumed"] == len(saved)
    runs = Counter(r["config"] for r in read_journal(journal))  # each finished configuration, once per run
    assert set(runs) == set(reference["config"]) and max(runs.values()) == 1, "a configuration was computed twice"
    pd.testing.assert_frame_equal(pd.read_parquet(out).drop(columns=WALL), reference)


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "worker processes"])
def test_a_reported_row_was_synced_to_disk_first(small, tmp_path, monkeypatch, workers):
    """Group commit (one fdatasync for the rows that arrive together) keeps the guarantee: every row a
    sweep reports (on_row, progress, the table) is in the journal file as it was at a sync made after
    the row was written. Rows written and not yet synced are in the file, so they survive any process's
    death; only a power failure can lose them, before they were reported."""
    from tpusim.explore.store import Journal

    synced: set[str] = set()  # configurations in the journal file at the last sync
    syncs = []
    real_sync = Journal.sync

    def sync(self):
        real_sync(self)
        syncs.append(1)
        synced.update(r["config"] for r in read_journal(self.path))

    monkeypatch.setattr(Journal, "sync", sync)
    reported = []

    def on_row(row):
        assert row["config"] in synced, "a row was reported before the journal holding it was synced"
        reported.append(row["config"])

    sweep = make_sweep(small, {"max_target_length": LENGTHS[:8], "remat_policy": ("full", "none")})
    run_sweep(sweep, out=tmp_path / "rows.parquet", workers=workers, on_row=on_row)
    assert len(reported) == 16 and 1 <= len(syncs) <= 16


def test_a_torn_last_line_is_a_row_that_did_not_finish(small, tmp_path):
    """SIGKILL in the middle of a journal write leaves a line without its newline: dropped, cut off, redone."""
    sweep = make_sweep(small, {"remat_policy": ("full", "none", "minimal")})
    out = tmp_path / "rows.parquet"
    run_sweep(sweep, out=out, workers=1)
    journal = journal_path(out)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    redone = []
    again = run_sweep(sweep, out=out, workers=1, on_row=lambda r: redone.append(r["config"]))
    assert again.resumed == 1 and len(redone) == 2
    assert [r["config"] for r in read_journal(journal)] == [json.loads(lines[0])["config"], *redone]


def test_a_corrupt_journal_line_is_refused(small, tmp_path):
    out = tmp_path / "rows.parquet"
    journal_path(out).write_text('{"config": "x"}\nnot json\n{"config": "y"}\n')
    with pytest.raises(TpusimError, match="line 2 is not a row of a tpusim sweep"):
        run_sweep(make_sweep(small, {"remat_policy": ("full",)}), out=out, workers=1)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "table of an older tpusim"])
def test_csv_resume_when_every_saved_row_is_ok(small, tmp_path, journal):
    """All ok: the CSV's reason column is all empty, which pandas reads back as a column of numbers."""
    sweep = make_sweep(small, {"remat_policy": ("full", "none")})
    out = tmp_path / "rows.csv"
    first = run_sweep(sweep, out=out, workers=1)
    assert set(first.rows.status) == {"ok"}
    if not journal:
        journal_path(out).unlink()
    again = run_sweep(sweep, out=out, workers=1)
    assert (again.resumed, again.simulated) == (2, 0)
    assert list(again.rows.reason) == ["", ""]
    assert len(read_journal(journal_path(out))) == 2  # an older table is copied into a new journal, once


def test_resume_with_other_varied_keys_is_refused_not_merged(small, tmp_path):
    """Rows without per_device_batch_size cannot be told apart from any of its values: refuse, touch nothing."""
    out = tmp_path / "rows.csv"
    r = CliRunner().invoke(main, ["sweep", str(small), "--vary", "remat_policy=full,none", "--out", str(out),
                                  "--workers", "1"])
    assert r.exit_code == 0, r.output
    before = out.read_bytes(), journal_path(out).read_bytes()
    r = CliRunner().invoke(main, ["sweep", str(small), "--vary", "remat_policy=full,none",
                                  "--vary", "per_device_batch_size=1,2", "--out", str(out), "--workers", "1"])
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "holds rows of another sweep: its rows have the keys" in r.stderr and "per_device_batch_size" in r.stderr
    assert (out.read_bytes(), journal_path(out).read_bytes()) == before
    journal_path(out).unlink()  # the table of an older tpusim: refused too, and no journal made for it
    with pytest.raises(TpusimError, match="holds rows of another sweep"):
        run_sweep(make_sweep(small, {"remat_policy": ("full", "none"), "per_device_batch_size": (1, 2)}), out=out)
    assert out.read_bytes() == before[0] and not journal_path(out).exists()


def test_repeated_values_are_refused(small):
    with pytest.raises(TpusimError, match="remat_policy lists 'full' twice"):
        make_sweep(small, {"remat_policy": ("full", "none", "full")})


def test_a_second_sweep_on_the_same_output_is_refused(small, tmp_path):
    from tpusim.explore.store import SweepOutput

    out = tmp_path / "rows.parquet"
    first = SweepOutput(out)
    try:
        with pytest.raises(TpusimError, match="another tpusim sweep is writing it"):
            run_sweep(make_sweep(small, {"remat_policy": ("full",)}), out=out, workers=1)
    finally:
        first.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_grid_of_10_8_streams(small, tmp_path):
    """10^4 x 10^4 configurations: made one at a time (a list of them would take many GB)."""
    out = tmp_path / "rows.parquet"
    values = ",".join(map(str, range(1, 10_001)))
    proc = _tpusim("sweep", str(small), "--vary", f"max_target_length={values}",
                   "--vary", f"per_device_batch_size={values}", "--yes", "--out", str(out), "--workers", "2")
    try:
        _wait_for(lambda: _lines(journal_path(out)) >= 4 or proc.poll() is not None, "the first rows")
        assert proc.poll() is None, proc.communicate()[1]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
        assert rss_kb < 500_000
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT_S)
    _no_survivors(proc.pid)


# ---- run --out: the folder is replaced whole or not at all ---------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_out(small: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["run", str(small), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def a_run(small, tmp_path_factory):
    """A run folder, made once; tests copy it."""
    out = tmp_path_factory.mktemp("r") / "run"
    r = _run_out(small, out)
    assert r.exit_code == 0, r.output
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_killed_while_writing_leaves_the_old_folder_whole(small, a_run, tmp_path):
    out = _copy(a_run, tmp_path)
    old = _snapshot(out)
    reached = tmp_path / "writing"
    # The real command, its report writer made to hang (after the timeline and trace are written).
    script = ("import sys, time, pathlib, tpusim.analysis.report as r\n"
              "def hang(*a, **k):\n"
              f"    pathlib.Path({str(reached)!r}).touch(); time.sleep(600)\n"
              "r.write_report = hang\n"
              "from tpusim.cli import main\n"
              f"main(['run', {str(small)!r}, '--mode', 'datasheet', '--out', {str(out)!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: reached.exists() or proc.poll() is not None, "the run to write")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
    assert _snapshot(out) == old  # entirely old
    check_run_folder(out)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    assert len(left) == 1  # the killed run's temporary folder ...
    assert _run_out(small, out, "--mode", "datasheet").exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")] == []  # ... removed by the next
    new = _snapshot(out)
    assert set(new) == set(old) and json.loads(new["summary.json"])["mode"] == "datasheet"  # entirely new
    check_run_folder(out)


def test_run_that_fails_while_writing_leaves_the_old_folder_whole(small, a_run, tmp_path, monkeypatch):
    import tpusim.analysis.report

    out = _copy(a_run, tmp_path)
    old = _snapshot(out)

    def disk_full(path, *a, **k):
        Path(path).write_text("<!DOCTYPE html>")  # half a report
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tpusim.analysis.report, "write_report", disk_full)
    r = _run_out(small, out, "--mode", "datasheet")
    assert r.exit_code == 2 and "cannot write the run: No space left on device" in r.stderr
    assert _snapshot(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("writer", ["tpusim.analysis.xspace.write_xspace",
                                    "tpusim.analysis.timeline.write_chrome_trace"])
def test_run_whose_trace_writer_fails_leaves_the_old_folder_whole(small, a_run, tmp_path, monkeypatch, writer):
    """The traces are written by a second process (cli.run._alongside) while this one writes the rest:
    its failure is this command's, with the same one-line message, and nothing is swapped in."""
    import importlib

    out = _copy(a_run, tmp_path)
    old = _snapshot(out)
    module, name = writer.rsplit(".", 1)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importlib.import_module(module), name, disk_full)
    r = _run_out(small, out, "--mode", "datasheet")
    assert r.exit_code == 2 and "cannot write the run: No space left on device" in r.stderr
    assert _snapshot(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_refuses_a_folder_it_did_not_write(small, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = _run_out(small, out)
    assert r.exit_code == 2 and "holds notes.txt, which tpusim run did not write" in r.stderr
    assert _snapshot(out) == {"notes.txt": b"keep me"}


def test_run_refuses_the_current_folder(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for here in (".", str(tmp_path.parent)):
        r = _run_out(small, Path(here))
        assert r.exit_code == 2 and "is the current folder (or holds it)" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["no manifest", "truncated timeline"])
def test_compare_refuses_an_incomplete_run_folder(small, a_run, tmp_path, damage):
    out = _copy(a_run, tmp_path)
    check_run_folder(out)  # complete before the damage
    if damage == "no manifest":
        (out / "manifest.json").unlink()
    else:
        data = (out / "timeline.parquet").read_bytes()
        (out / "timeline.parquet").write_bytes(data[: len(data) // 2])
    r = CliRunner().invoke(main, ["compare", str(out), str(small)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert f"{out}: not a complete run folder" in r.stderr


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_undone(small, a_run, tmp_path, monkeypatch):
    """Where renameat2 is missing the swap is two renames; a run killed between them (old set aside, new
    not yet in place) has the old folder put back by the next run into DIR."""
    import tpusim.runfolder as rf

    monkeypatch.setattr(rf, "_exchange", lambda a, b: False)
    out = _copy(a_run, tmp_path)
    assert _run_out(small, out, "--mode", "datasheet").exit_code == 0  # the two-rename path, uninterrupted
    assert json.loads(_snapshot(out)["summary.json"])["mode"] == "datasheet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / "run").rename(tmp_path / f".run.tpusim-old.{dead.pid}")  # killed between the renames ...
    shutil.copytree(a_run, tmp_path / f".run.tpusim-tmp.{dead.pid}.x")  # ... with its new folder beside
    rf.RunFolder(out).discard()  # what the next run does first
    assert json.loads(_snapshot(out)["summary.json"])["mode"] == "datasheet"  # the old one, back whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_out_refuses_a_profile_logdir(tmp_path):
    """A profile's logdir has plugins/profile/<run>/*.xplane.pb, as a run folder does: without a
    manifest listing them, run --out must refuse it rather than replace it (and the profile) whole."""
    from click.testing import CliRunner

    from tpusim.cli import main

    logdir = tmp_path / "logdir"
    (logdir / "plugins" / "profile" / "2026_01_01").mkdir(parents=True)
    profile = logdir / "plugins" / "profile" / "2026_01_01" / "host.xplane.pb"
    profile.write_bytes(b"a real profile")
    r = CliRunner().invoke(main, ["run", "workloads/llama3_8b_fsdp_tp.yaml", "--out", str(logdir)])
    assert r.exit_code == 2 and "plugins" in r.output, r.output
    assert profile.read_bytes() == b"a real profile"
