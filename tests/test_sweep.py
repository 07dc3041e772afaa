"""Sweeps: the grid, rows that say why, the same rows serially / in processes / on Ray, resume, the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from tpusim.cli import main
from tpusim.errors import TpusimError
from tpusim.analysis.summary import summarize
from tpusim.explore.sweep import (
    MAX_GRID,
    journal_path,
    make_sweep,
    parse_vary,
    read_journal,
    read_rows,
    read_sweep_file,
    run_sweep,
    write_rows,
)
from tpusim.explore.store import encode_row

# A small, fast workload (LLaMA-3 8B widths, 2 layers) on a v5e 4x4: a simulation takes ~10 ms.
SMALL = {"name": "small", "chip": "v5e", "topology": "v5e:4x4",
         "model": {"model_name": "llama3-8b", "base_num_decoder_layers": 2},
         "step": {"per_device_batch_size": 1, "max_target_length": 1024},
         "sharding": {"ici_fsdp_parallelism": -1}}
# tensor 3 does not divide 16 chips (invalid); 64 sequences per chip do not fit in 16 GB (infeasible).
GRID = {"ici_tensor_parallelism": (1, 2, 3), "remat_policy": ("full", "none"), "per_device_batch_size": (1, 64)}
WALL = ["sim_wall_s"]  # the only column that is not deterministic


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def _frame(run) -> pd.DataFrame:
    return run.rows.drop(columns=WALL)


def test_parse_vary_reads_yaml_scalars():
    assert parse_vary(["a=1,0.5,full,true", "topology=v5e:16x16,v5e:8x16"]) == {
        "a": (1, 0.5, "full", True), "topology": ("v5e:16x16", "v5e:8x16")}


@pytest.mark.parametrize("item, says", [("per_device_batch_size", "is not KEY=V1,V2"), ("=1,2", "is not KEY=V1,V2"),
                                        ("remat_policy=", "empty value"), ("remat_policy=full,,none", "empty value"),
                                        ("x=[1", "not a YAML scalar")])
def test_parse_vary_refuses_malformed(item, says):
    with pytest.raises(TpusimError, match=says):
        parse_vary([item])


def test_unknown_key_is_refused_with_the_loaders_suggestion(small):
    with pytest.raises(TpusimError) as e:
        make_sweep(small, {"per_devce_batch_size": (1, 2)})
    assert e.value.source == "--vary" and "did you mean 'per_device_batch_size'" in e.value.message


def test_grid_limit_needs_yes(small):
    vary = {"per_device_batch_size": tuple(range(1, 51)), "max_target_length": tuple(range(1, 51))}
    assert 2500 > MAX_GRID
    with pytest.raises(TpusimError, match="2,500 configurations, more than 2,000: pass --yes"):
        make_sweep(small, vary)
    assert make_sweep(small, vary, yes=True).size == 2500


def test_rows_say_why_and_carry_every_summary_field(small):
    run = run_sweep(make_sweep(small, GRID), workers=1)
    df = run.rows
    assert run.total == len(df) == 12 and list(df["index"]) == list(range(12))
    assert list(df.columns[:5]) == ["index", "config", *GRID]
    assert (df[df.ici_tensor_parallelism == 3].status == "invalid").all()
    assert df[df.ici_tensor_parallelism == 3].reason.str.contains("ici_tensor_parallelism=3 does not divide").all()
    oom = df[(df.per_device_batch_size == 64) & (df.ici_tensor_parallelism != 3)]
    assert (oom.status == "infeasible").all() and oom.reason.str.contains("does not fit in HBM").all()
    ok = df[df.status == "ok"]
    assert len(ok) == 4 and (ok.reason == "").all() and (ok.mfu > 0).all()
    # every field of `tpusim run --json` is a column (mappings of fixed keys as parent.key)
    from tpusim.api import compile_workload
    from tpusim.sim.engine import simulate

    _, topo, prog = compile_workload(small, overrides={"remat_policy": "full"})
    for key in summarize(simulate(prog, topo)):
        assert key in df.columns or any(c.startswith(f"{key}.") for c in df.columns), key
    assert json.loads(ok.iloc[0]["busiest_links"])[0]["link"].startswith("ICI")


def test_same_rows_serially_and_in_processes(small):
    sweep = make_sweep(small, GRID)
    pd.testing.assert_frame_equal(_frame(run_sweep(sweep, workers=1)), _frame(run_sweep(sweep, workers=2)))


def test_same_rows_on_ray(small):
    import ray  # in the test extra: this test must run, not skip
    from tpusim.explore.workers import RAY_BATCH

    sweep = make_sweep(small, GRID)
    assert sweep.size % RAY_BATCH and sweep.size > RAY_BATCH  # batches of configurations, the last one partial
    serial = _frame(run_sweep(sweep, workers=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pd.testing.assert_frame_equal(serial, _frame(run_sweep(sweep, ray="auto")))
    finally:
        ray.shutdown()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("saved", ["journal", "table of an older tpusim"])
def test_resume_redoes_nothing(small, tmp_path, suffix, saved):
    sweep = make_sweep(small, GRID)
    whole = tmp_path / f"whole{suffix}"
    full = run_sweep(sweep, out=whole, workers=1)
    out = tmp_path / f"cut{suffix}"
    run_sweep(sweep, out=out, workers=1)
    kept = read_rows(out)[::2]  # an interrupted run: half the rows, not the first half
    if saved == "journal":  # the truth: the table beside it, even if whole, is rewritten from it
        kept = read_journal(journal_path(out))[::2]
        journal_path(out).write_bytes(b"".join(encode_row(r) for r in kept))
    else:
        journal_path(out).unlink()
        write_rows(kept, out)
    computed = []
    again = run_sweep(sweep, out=out, workers=2, on_row=lambda row: computed.append(row["config"]))
    assert again.resumed == 6 and again.simulated == 6
    assert sorted(computed) == sorted(set(_frame(full)["config"]) - {r["config"] for r in kept})
    pd.testing.assert_frame_equal(_frame(again), _frame(full))
    pd.testing.assert_frame_equal(pd.DataFrame(read_rows(out)).drop(columns=WALL),
                                  pd.DataFrame(read_rows(whole)).drop(columns=WALL))
    assert run_sweep(sweep, out=out, workers=1).simulated == 0


def test_interrupted_sweep_keeps_what_it_computed(small, tmp_path):
    sweep = make_sweep(small, GRID)
    out = tmp_path / "rows.parquet"

    def interrupt_after_five(row, seen=[]):  # noqa: B006 - a counter across calls
        seen.append(row)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out=out, workers=1, on_row=interrupt_after_five, flush_s=1e9)
    # Every row handed over is kept, and so is every row computed and journaled before the interrupt
    # (the journal is synced per group of rows, so a few may have finished after the fifth was reported).
    kept = {r["config"] for r in read_rows(out)}
    assert {r["config"] for r in interrupt_after_five.__defaults__[0]} <= kept
    assert run_sweep(sweep, out=out, workers=1).simulated == 12 - len(kept)


def test_output_of_another_sweep_is_not_overwritten(small, tmp_path):
    out = tmp_path / "rows.parquet"
    run_sweep(make_sweep(small, {"remat_policy": ("full", "none")}), out=out, workers=1)
    with pytest.raises(TpusimError, match="rows of another sweep"):
        run_sweep(make_sweep(small, {"remat_policy": ("full",)}), out=out, workers=1)
    assert len(read_rows(out)) == 2


def test_cli_sweep_file_varies_topology(small, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"workload": small.name, "topologies": ["v5e:4x4", "v5e:2x4", "v5e:3x5"],
                                    "vary": {"remat_policy": ["full", "none"]}}))
    out = tmp_path / "rows.csv"
    r = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out), "--workers", "1", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["total"] == 6 and payload["counts"] == {"ok": 4, "invalid": 2}
    rows = pd.read_csv(out)
    assert list(rows.topology) == ["v5e:4x4"] * 2 + ["v5e:2x4"] * 2 + ["v5e:3x5"] * 2
    assert set(rows[rows.topology == "v5e:2x4"].chips) == {8}
    human = CliRunner().invoke(main, ["sweep", str(grid), "--out", str(out)])
    assert human.exit_code == 0 and "6 already in" in human.stdout and "0 simulated" in human.stdout
    assert read_sweep_file(small) is None  # a workload, not a sweep


def test_cli_exact_rows_are_the_run_commands(small, tmp_path):
    """--exact simulates each step whole: its rows hold tpusim run --json's step time to the last digit
    (without it, the step is extrapolated in its layers, equal to 1e-9: tests/test_periodic.py)."""
    out = tmp_path / "rows.csv"
    r = CliRunner().invoke(main, ["sweep", str(small), "--vary", "remat_policy=full,none", "--exact", "--out",
                                  str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    from tpusim.analysis.summary import summarize
    from tpusim.api import compile_workload
    from tpusim.config import read_yaml
    from tpusim.model.workload import workload_from_dict
    from tpusim.sim.engine import simulate

    rows = pd.read_csv(out)  # (pandas reads floats back exactly)
    for policy in ("full", "none"):
        w = workload_from_dict(read_yaml(small), source=str(small), overrides={"remat_policy": policy})
        _, topo, prog = compile_workload(w)
        assert rows[rows.remat_policy == policy].step_time_s.item() == summarize(simulate(prog, topo))["step_time_s"]


@pytest.mark.parametrize("args, says", [
    (["--vary", "per_devce_batch_size=1,2"], "--vary: per_devce_batch_size: unknown key (did you mean"),
    (["--vary", "remat_policy="], "--vary: remat_policy has an empty value"),
    (["--vary", "remat_policy"], "is not KEY=V1,V2"),
    (["--vary", "per_device_batch_size=" + ",".join(map(str, range(1, 46))),
      "--vary", "max_target_length=" + ",".join(map(str, range(1, 46)))], "more than 2,000: pass --yes"),
    (["--vary", "remat_policy=full", "--out", "rows.txt"], "write .parquet or .csv"),
    ([], "nothing to vary"),
])
def test_cli_bad_input_is_one_line_and_exit_2(small, args, says):
    r = CliRunner().invoke(main, ["sweep", str(small), *args])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and says in r.stderr and r.stdout == ""
