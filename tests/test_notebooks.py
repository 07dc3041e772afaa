"""Every notebook in notebooks/ runs from top to bottom, at its small size, without raising, and the
conclusions its text (and the README, docs/VALIDATION.md) draws hold, against the book's thresholds.

The notebooks are stored without outputs; each has a cell tagged ``parameters`` and the tests add a
cell after it that sets ``SIZE = "small"`` (papermill's convention), then execute the notebook with
nbclient in a fresh kernel, from notebooks/ as Jupyter would. To read what the notebook computed, the
tests also append, in memory only, one cell that prints the notebook's own variables as JSON (the
``.ipynb`` files are not changed). The conclusions are asserted against the book's numbers
(tests/data/book-cases.yaml, tests/data/tpu-specs.yaml), never against the numbers printed today;
``-m slow`` checks them again at full size.

``python tests/test_notebooks.py`` runs them at full size and writes their main charts to docs/
(the screenshots the README shows).
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 120  # per cell
DATA = REPO / "tests" / "data"
MARK = "TPUSIM-NOTEBOOK-FACTS:"

# What each notebook computed, read from its kernel after its last cell: an expression over its variables.
FACTS = {
    "1_quickstart": "{'summary': summary, 'book_summary': book_summary, 'links': result.link_stats,"
                    " 'tokens_per_chip': workload.step.per_device_batch_size * workload.step.seq_len}",
    "2_sharding_tradeoffs": "{'sweep': sweep.to_dict('records'),"
                            " 'crossover': {t: crossover(g) for t, g in sweep.groupby('topology')}}",
    "3_real_profile": "{'ops': rep.ops.to_dict('records'), 'topology': rep.topology.name}",
    "4_topology_congestion": "{'wrap': {k: summarize(v) for k, v in wrap_runs.items()},"
                             " 'wrap_links': {k: v.link_stats for k, v in wrap_runs.items()},"
                             " 'slices': {k: summarize(v) for k, v in slice_runs.items()},"
                             " 'slice_links': {k: v.link_stats for k, v in slice_runs.items()},"
                             " 'tokens_per_chip': workload.step.per_device_batch_size * workload.step.seq_len,"
                             " 'congested': s, 'congested_links': congested.link_stats}",
    "5_serving": "{'steps': frame.to_dict('records'), 'load': load.to_dict('records'),"
                 " 'sweep': sweep_rows[['concurrency', 'status', 'throughput.output_tokens_per_s_per_chip',"
                 " 'ttft_s.p50']].to_dict('records')}",
    "6_pipeline": "{'bubbles': frame.to_dict('records'), 'memory': mem.to_dict('records'), 'P': P, 'M': M,"
                  " 'real': real.to_dict('records')}",
}


def execute(path: Path, facts: str | None = None, **params) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` with ``params`` set after its parameters cell; returns it with outputs.
    ``facts``: an expression whose value (JSON) a last cell, added in memory, prints."""
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path.name}: needs exactly one cell tagged 'parameters', has {len(tagged)}")
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    if facts:
        source = f"import json as _json\nprint({MARK!r} + _json.dumps({facts}, default=lambda o: o.item()))"
        nb.cells.append(nbformat.v4.new_code_cell(source,
                                                  metadata={"tags": ["injected-facts"]}))
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


@cache
def run(stem: str, size: str = "small") -> tuple[nbformat.NotebookNode, dict]:
    """The executed notebook and the facts it printed (each notebook runs once per size per session)."""
    nb = execute(REPO / "notebooks" / f"{stem}.ipynb", FACTS[stem], SIZE=size)
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert MARK in text, f"{stem}: the facts cell printed nothing"
    return nb, json.loads(text[text.index(MARK) + len(MARK):])


@cache
def book_cases() -> dict[str, dict]:
    return {c["id"]: c for c in yaml.safe_load((DATA / "book-cases.yaml").read_text())}


@cache
def specs() -> dict:
    return yaml.safe_load((DATA / "tpu-specs.yaml").read_text())["tpu"]


def spec(chip: str, key: str) -> float:
    """A number from the book's spec table (YAML may hold it as a string like '1.97e14')."""
    return float(specs()[chip][key]["value"])


def book(case_id: str, key: str, section: str = "expected") -> float:
    return float(book_cases()[case_id][section][key]["value"])


def test_there_are_six_notebooks_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["1_quickstart.ipynb", "2_sharding_tradeoffs.ipynb",
                                           "3_real_profile.ipynb", "4_topology_congestion.ipynb", "5_serving.ipynb",
                                           "6_pipeline.ipynb"]
    assert sorted(FACTS) == [p.stem for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs stored"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, path.name
        assert any("SIZE" in c.source for c in code if "parameters" in c.metadata.get("tags", [])), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb, _ = run(path.stem)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    charts = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "vegaEmbed" in o.get("data", {}).get("text/html", "") or any("vegalite" in k for k in o.get("data", {}))
              or "image/svg+xml" in o.get("data", {})]
    assert charts, f"{path.name} showed no chart"


# ---- the conclusions, against the book ------------------------------------------------------------

def check_quickstart(f: dict) -> None:
    """Notebook 1 / the README: FSDP's weight gathers hide behind the matmuls, on both axes evenly. The
    book (training.md): FSDP over M_X axes is compute-bound above C / (M_X W_ici) tokens per chip,
    1,094 for v5e over its 2 axes; fsdp_70b has 4,096. With the book's schedule (gradients
    reduce-scattered beside the backward) the step is compute-bound, the engine tests' criterion: under 5%
    of the step exposed. As libtpu compiles it over 256 chips (each gradient all-reduced whole and
    synchronously), what is exposed is those all-reduces, and the step is longer by their exposed time."""
    threshold = spec("v5e", "bf16_flops") / spec("v5e", "ici_link_bw_bidi") / 2
    s, book_s = f["summary"], f["book_summary"]
    assert f["tokens_per_chip"] > threshold
    assert book_s["bottleneck"].startswith("compute") and book_s["exposed_comm_s"] < 0.05 * book_s["step_time_s"]
    exposed = s["exposed_comm_by_kind_s"]
    assert max(exposed, key=exposed.get) == "all-reduce"
    assert s["step_time_s"] - book_s["step_time_s"] == pytest.approx(exposed["all-reduce"], rel=0.1)
    links = f["links"]  # a 16x16 torus with FSDP over both axes: every direction moves the same bytes
    assert len({links[k]["bytes"] for k in ("ICI x+", "ICI x-", "ICI y+", "ICI y-")}) == 1


def check_sharding(f: dict, shapes=("v5p:4x4x4",), crossover: bool = True) -> None:
    """Notebook 2 / docs/VALIDATION.md: pure FSDP is communication-bound exactly below the book's 850
    tokens per chip (C / (3 W_ici) on v5p, training-dp-fsdp-critical-batch-v5p, rounded: no sweep point
    is within 1% of it), and on the 4x4x4 slice (tensor on a ring) the mixed layout stops winning
    between the sweep points around 850."""
    limit = book("training-dp-fsdp-critical-batch-v5p", "per_chip_3axes")
    fsdp = [r for r in f["sweep"] if r["strategy"] == "FSDP"]
    assert len(fsdp) >= 3 and {r["topology"] for r in fsdp} >= set(shapes)
    assert all(abs(r["tokens_per_chip"] / limit - 1) > 0.01 for r in fsdp)
    for r in fsdp:
        assert r["bottleneck"].startswith("communication") == (r["tokens_per_chip"] < limit), r
    for shape in shapes if crossover else ():
        lo, hi = f["crossover"][shape]
        assert lo is not None and hi is not None and lo < limit <= hi, (shape, lo, hi)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at 80 layers, with matmuls at the measured 83% of peak, the mixed layout stops "
                   "winning between 256 and 512 tokens per chip, below the book's 850: tpusim keeps its "
                   "tensor-parallel collectives exposed (no collective matmul; XLA's own compile does not hide "
                   "them either, tests/test_engine.py), so it loses to FSDP before FSDP turns compute-bound")
def test_sharding_crossover_at_full_size():
    f = run("2_sharding_tradeoffs", "full")[1]
    limit = book("training-dp-fsdp-critical-batch-v5p", "per_chip_3axes")
    lo, hi = f["crossover"]["v5p:4x4x4"]
    assert lo is not None and hi is not None and lo < limit <= hi, (lo, hi)


def check_real_profile(f: dict) -> None:
    """Notebook 3: the measured host-to-HBM copies of the 5.37 GB array run a little slower than the
    v6e's datasheet PCIe rate (tpu-specs: 3.2e10 B/s): slower, and within the replay's 18% budget."""
    pcie = spec("v6e", "pcie_bw_per_chip")
    array_bytes = 5 * 1024 * 1024 * 256 * 4
    copies = [r for r in f["ops"] if r["category"] == "copy-done" and r["measured_s"] > 1e-3]
    assert f["topology"] == "v6e:2x4" and len(copies) == 4
    for r in copies:
        assert 1.0 < r["measured_s"] / (array_bytes / pcie) < 1.18, r["name"]


def check_topology(f: dict) -> None:
    """Notebook 4. Wraparound: the book's line is exactly twice the ring on the busiest link ("no
    wraparound typically doubles the time"), and on lines FSDP needs 2 C / (2 W_ici) = 2,188 tokens
    per chip to be compute-bound, so at 1,024 the gathers show. The compute is the same on every
    slice. DCN: the gradients' ring all-reduce puts (S-1)/S of the same bytes on each chip's NIC."""
    wrap, links = f["wrap"], f["wrap_links"]
    ring, line, half = "16x16, both axes wrap", "16x16, no wraparound", "16x16, only y wraps"
    assert links[line]["ICI x+"]["bytes"] == pytest.approx(2 * links[ring]["ICI x+"]["bytes"], rel=1e-12)
    assert links[line]["ICI y-"]["bytes"] == pytest.approx(2 * links[ring]["ICI y-"]["bytes"], rel=1e-12)
    assert len({round(s["compute_s"], 9) for s in wrap.values()}) == 1
    line_threshold = spec("v5e", "bf16_flops") / spec("v5e", "ici_link_bw_one_way") / 2
    assert f["tokens_per_chip"] < line_threshold and wrap[line]["bottleneck"].startswith("communication")
    assert wrap[ring]["exposed_comm_s"] < wrap[half]["exposed_comm_s"] < wrap[line]["exposed_comm_s"]
    assert wrap[ring]["step_time_s"] < wrap[half]["step_time_s"] < wrap[line]["step_time_s"]
    runs, nics = f["slices"], f["slice_links"]
    one, two, four = (f"{n} slice{'s' if n > 1 else ''} of v5p:4x4x4" for n in (1, 2, 4))
    assert len({round(s["compute_s"], 9) for s in runs.values()}) == 1
    assert "DCN" not in nics[one] or nics[one]["DCN"]["bytes"] == 0
    assert nics[four]["DCN"]["bytes"] / nics[two]["DCN"]["bytes"] == pytest.approx((3 / 4) / (1 / 2), rel=1e-9)
    # The congested run: the tensor axis sits on x, so x carries the tensor collectives and y only FSDP's.
    c = f["congested_links"]
    assert c["ICI x+"]["bytes"] > c["ICI y+"]["bytes"] and "tensor" in f["congested"]["bottleneck"]


def test_quickstart_conclusions():
    check_quickstart(run("1_quickstart")[1])


def test_sharding_conclusions():
    check_sharding(run("2_sharding_tradeoffs")[1])


@pytest.mark.xfail(strict=True, reason="the book has FSDP x TP compute-bound above alpha^2 / (M_X M_Y F) tokens "
                   "per chip (113 for LLaMA-3 70B on v5p) because it overlaps every tensor-parallel collective "
                   "with the matmuls (collective matmul); tpusim runs the reduce-scatters and the backward's gathers "
                   "so from 8192 tokens per tensor group, but keeps the forward's gathers before Q/K/V and the MLP "
                   "synchronous, as libtpu compiles them, and below 8192 tokens all of them, so they stay exposed")
def test_sharding_mixed_layout_is_compute_bound_above_the_books_batch():
    limit = book("appl-train-fsdp-tp-plan", "min_per_chip")
    mixed = [r for r in run("2_sharding_tradeoffs")[1]["sweep"] if r["strategy"] != "FSDP" and r["tokens_per_chip"] > limit]
    assert mixed and all(r["bottleneck"].startswith("compute") for r in mixed)


def test_real_profile_conclusions():
    check_real_profile(run("3_real_profile")[1])


def test_topology_conclusions():
    check_topology(run("4_topology_congestion")[1])


def check_serving(f: dict) -> None:
    """Notebook 5: a decode step costs more as the batch grows (weights read once, KV cache per request),
    and past saturation the co-located replicas' throughput flattens while the time to first token grows."""
    steps = pd.DataFrame(f["steps"])
    assert steps.groupby("batch").time_ms.sum().is_monotonic_increasing
    load = pd.DataFrame(f["load"])
    co = load[load.config == "co-located"].sort_values("rate")
    low, high = co.iloc[0], co.iloc[-1]
    assert high.ttft_p50_s > low.ttft_p50_s
    # output tokens/s grows less than the offered rate: the replicas saturate
    assert high.output_tokens_per_s / low.output_tokens_per_s < high.rate / low.rate
    # the sweep's curve: more clients, more tokens/s per chip until the slots are full, then flat (within
    # 5%, tests/test_serving_sweep.py's saturation budget), and a longer TTFT
    curve = pd.DataFrame(f["sweep"]).sort_values("concurrency")
    assert (curve.status == "ok").all()
    per_chip = curve["throughput.output_tokens_per_s_per_chip"].to_numpy()
    saturated = int(np.argmax(per_chip >= 0.95 * per_chip.max()))
    assert (np.diff(per_chip[:saturated + 1]) > 0).all()
    assert (per_chip[saturated:] >= 0.95 * per_chip.max()).all()
    assert curve["ttft_s.p50"].iloc[-1] > curve["ttft_s.p50"].iloc[0]


def test_serving_conclusions():
    check_serving(run("5_serving")[1])


def check_pipeline(f: dict) -> None:
    """Notebook 6 / docs/VALIDATION.md: with free communication the simulated bubble is the Ultra-Scale
    Playbook's (p-1)/m (GPipe, 1F1B) and (p-1)/(m v) (interleaved) within the stages' spread in busy time
    (the first stage's embedding and the last's loss, which the Playbook's identical stages lack: the
    slowest stage sets the pace), times 1 + bubble, plus 0.1% for the permutes' latency; 1F1B holds p - s
    microbatches on stage s, GPipe all m; on the real workload the permutes and per-microbatch FSDP
    gathers only add to the bubble."""
    for r in f["bubbles"]:
        v = 2 if r["schedule"].startswith("interleaved") else 1
        assert r["formula"] == pytest.approx(3 / (r["microbatches"] * v))
        tol = (1 + r["formula"]) * r["spread"] + 1e-3  # (tests/test_pipeline.py says why)
        assert r["spread"] < 0.01 and r["simulated"] == pytest.approx(r["formula"], abs=tol), r
    held = {(r["schedule"], r["stage"]): r["microbatches held"] for r in f["memory"]}
    assert [held["1f1b", s] for s in range(f["P"])] == [f["P"] - s for s in range(f["P"])]
    assert {held["gpipe", s] for s in range(f["P"])} == {f["M"]}
    assert all(r["bubble simulated"] > r["formula"] for r in f["real"])


def test_pipeline_conclusions():
    check_pipeline(run("6_pipeline")[1])


@pytest.mark.slow
def test_conclusions_at_full_size():
    """The same conclusions at the size the docs quote (80 layers; both v5p slices of notebook 2); the
    crossover of the two layouts at full size is its own test below."""
    check_quickstart(run("1_quickstart", "full")[1])
    check_sharding(run("2_sharding_tradeoffs", "full")[1], shapes=("v5p:4x4x4",), crossover=False)
    check_real_profile(run("3_real_profile", "full")[1])
    check_topology(run("4_topology_congestion", "full")[1])
    check_serving(run("5_serving", "full")[1])
    check_pipeline(run("6_pipeline", "full")[1])


if __name__ == "__main__":
    docs = REPO / "docs"
    for p in NOTEBOOKS:
        print(f"{p.name} -> {docs}/", file=sys.stderr)
        execute(p, SIZE="full", SAVE_TO=str(docs))
