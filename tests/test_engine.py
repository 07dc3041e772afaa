"""The engine: uncontended collectives equal the collective model, congestion appears by itself,
the book's regimes come out of the simulation, and runs are deterministic and symmetric."""

from __future__ import annotations


import pytest

from tpusim.sim.chips import get_chip
from tpusim.sim.collectives import Span, collective_time, link_params, lower
from tpusim.compiler import compile_program
from tpusim.sim.engine import simulate
from tpusim.sim.program import COLLECTIVE, COMPUTE, Memory, Op, Program
from tpusim.analysis.summary import summarize
from tpusim.analysis.timeline import COLUMNS, chrome_trace, timeline_frame
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import workload_from_dict

# tpu-recipes' remat_policy custom (v6e Llama 3.1): the layer input and the q/k/v/out projections offloaded
RECIPES_CUSTOM = {k: "offload" for k in ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj")}

NO_MEMORY = Memory(params=0, grads=0, optimizer=0, activations=0, working=0, gathered_weights=0)


def program_of(ops, name="test"):
    return Program(name=name, ops=tuple(ops), devices=1, model_flops_per_step=1.0, tokens_per_step=1.0,
                   memory=NO_MEMORY, hbm_capacity_bytes=1.0)


def collective_op(i, kind, nbytes, axes, deps=()):
    return Op(index=i, name=f"{kind}.{i}", stream=COLLECTIVE, category=kind, bytes=nbytes, mesh_axes=("m",),
              axes=tuple(axes), deps=tuple(deps))


def waiter(i, deps):
    return Op(index=i, name=f"wait.{i}", stream=COMPUTE, category="elementwise", deps=tuple(deps))


def async_rows(result):
    df = timeline_frame(result)
    return df[df.stream == "Async XLA Ops"].set_index("op_index")


@pytest.mark.parametrize("mode", ["datasheet", "calibrated"])
@pytest.mark.parametrize("spec, slices, kind, axes, nbytes", [
    ("v5e:16x16", 1, "all-gather", ("x",), 1e8),
    ("v5e:8x16", 1, "reduce-scatter", ("x", "y"), 3e8),
    ("v5p:4x4x8", 1, "all-reduce", ("x", "y", "z"), 1e9),
    ("v5p:4x4x4", 1, "all-to-all", ("x", "z"), 2e8),
    ("v5p:4x4x4", 1, "collective-permute", ("y",), 5e7),
    ("v5p:4x4x4", 4, "all-reduce", ("x", "y", "z", "dcn"), 4e9),
    ("v5e:16x16", 1, "all-gather", (Span("x", 4, 4), "y"), 1e8),
    ("v5e:16x16", 1, "all-gather", ("x",), 1e3),  # latency-bound
])
def test_single_collective_equals_the_model(mode, spec, slices, kind, axes, nbytes):
    topo = parse_topology(spec, slices=slices)
    prog = program_of([collective_op(0, kind, nbytes, axes), waiter(1, [0])])
    result = simulate(prog, topo, mode=mode)
    row = async_rows(result).loc[0]
    # A collective in a program pays the in-step fixed cost (calibrated mode), not the host-timed one.
    expected = collective_time(lower(kind, nbytes, topo, axes), link_params(topo, mode, in_step=True))
    assert row.end_s - row.start_s == pytest.approx(expected, rel=1e-9)
    assert result.step_time_s == pytest.approx(expected, rel=1e-9)


def test_book_closed_form_through_the_engine():
    """Datasheet mode: the book's (X-1)/X V / W_ici for an all-gather on a 16-ring of v5e."""
    topo = parse_topology("v5e:16x16")
    result = simulate(program_of([collective_op(0, "all-gather", 1e9, ("x",)), waiter(1, [0])]), topo,
                      mode="datasheet")
    assert result.step_time_s == pytest.approx(15 / 16 * 1e9 / 9e10, rel=1e-9)


def test_congestion_on_shared_links_only():
    topo = parse_topology("v5e:16x16")
    lp = link_params(topo, "datasheet")
    alone = collective_time(lower("all-gather", 1e9, topo, ("x",)), lp)
    shared = simulate(program_of([collective_op(0, "all-gather", 1e9, ("x",)),
                                  collective_op(1, "all-gather", 1e9, ("x",)), waiter(2, [0, 1])]),
                      topo, mode="datasheet")
    rows = async_rows(shared)
    for i in (0, 1):  # two transfers share each link's bandwidth: both take twice as long
        assert rows.loc[i].end_s - rows.loc[i].start_s == pytest.approx(2 * alone, rel=1e-9)
    disjoint = simulate(program_of([collective_op(0, "all-gather", 1e9, ("x",)),
                                    collective_op(1, "all-gather", 1e9, ("y",)), waiter(2, [0, 1])]),
                        topo, mode="datasheet")
    rows = async_rows(disjoint)
    for i in (0, 1):
        assert rows.loc[i].end_s - rows.loc[i].start_s == pytest.approx(alone, rel=1e-9)
    # A later arrival slows the first one down only while they overlap.
    staggered = simulate(program_of([
        collective_op(0, "all-gather", 1e9, ("x",)),
        Op(index=1, name="busy", stream=COMPUTE, category="elementwise", flops=0, hbm_bytes=alone / 2 * 8.2e11),
        collective_op(2, "all-gather", 1e9, ("x",), deps=(1,)), waiter(3, [0, 2])]),
        parse_topology("v5e:16x16"), mode="datasheet")
    rows = async_rows(staggered)
    assert rows.loc[0].end_s == pytest.approx(alone * 1.5, rel=1e-6)
    assert rows.loc[2].end_s == pytest.approx(alone * 2.0, rel=1e-6)


def small_workload(**kw):
    base = {"model": {"base_emb_dim": 2048, "base_num_query_heads": 16, "head_dim": 128, "base_mlp_dim": 8192,
                      "base_num_decoder_layers": 4, "vocab_size": 32000},
            "step": {"per_device_batch_size": 2, "max_target_length": 1024}}
    for k, v in kw.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.update({k: v})
    return workload_from_dict(base, source="test")


def test_deterministic_byte_for_byte(tmp_path):
    from tpusim.analysis.timeline import write_parquet

    topo = parse_topology("v5p:4x4x4")
    prog = compile_program(small_workload(sharding={"ici_tensor_parallelism": 4}), topo)
    paths = []
    for k in range(2):
        df = timeline_frame(simulate(prog, topo))
        paths.append(tmp_path / f"t{k}.parquet")
        write_parquet(df, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_timeline_schema_and_chrome_trace():
    topo = parse_topology("v5p:4x4x4")
    prog = compile_program(small_workload(), topo)
    result = simulate(prog, topo)
    df = timeline_frame(result)
    assert list(df.columns) == COLUMNS
    assert (df.end_s >= df.start_s).all() and df.end_s.max() == pytest.approx(result.step_time_s)
    assert set(df.stream) == {"XLA Ops", "Async XLA Ops", "ICI x", "ICI y", "ICI z"}
    assert (df.replicas == 64).all() and set(df.device) == {0}
    compute = df[df.stream == "XLA Ops"]
    assert len(compute) == len(prog.compute_ops)
    assert compute.flops.sum() == pytest.approx(prog.flops_per_device)
    import json
    trace = json.loads(json.dumps(chrome_trace(df, result)))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"/device:TPU:0"}
    threads = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"XLA Modules", "XLA Ops", "Async XLA Ops"} <= threads
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(df) + 1 and all(e["dur"] >= 0 for e in xs)


def test_cost_is_flat_in_the_chip_count():
    """Same per-device program on a 64-chip and a 512-chip slice: the same events, not 8x more.

    Counted by the reference engine (one event per op, transfer and wait): the fast engine's count is
    what is left after merging, which moves with where the compute stream has to wait."""
    events, fast = [], []
    for spec in ("v5p:4x4x4", "v5p:8x8x8"):
        topo = parse_topology(spec)
        prog = compile_program(small_workload(), topo)
        events.append(simulate(prog, topo, plain=True).events)
        fast.append(simulate(prog, topo).events)
    assert events[1] == pytest.approx(events[0], rel=0.05)  # waits differ a little; 8x the chips
    assert fast[0] < events[0] and fast[1] < events[1]


def test_straggler_breaks_symmetry():
    topo = parse_topology("v5p:4x4x4")
    prog = compile_program(small_workload(), topo)
    base = simulate(prog, topo)
    slow = simulate(prog, topo, stragglers={5: 1.5})
    assert [len(c["devices"]) for c in slow.classes] == [63, 1]
    assert 1.3 * base.step_time_s < slow.step_time_s < 1.55 * base.step_time_s
    df = timeline_frame(slow)
    assert set(df.device) == {0, 5}


# ---- the book's regimes, from simulation (datasheet mode) ------------------------------------------

def regime(tokens_per_chip, spec="v5p:4x4x4", slices=1, sharding=None, d=4096, f=16384, layers=4, step=None):
    """A weight-matmul-dominated model (short sequences, small vocab, no remat) at a per-chip token batch;
    ``step``: more step keys."""
    seq = 128
    seqs = max(1, round(tokens_per_chip / seq))  # whole sequences per chip
    w = workload_from_dict({"model": {"base_emb_dim": d, "base_num_query_heads": d // 128, "head_dim": 128,
                                      "base_mlp_dim": f, "base_num_decoder_layers": layers, "vocab_size": 1024,
                                      "mlp_activations": ["gelu"]},
                            "step": {"per_device_batch_size": seqs, "max_target_length": seq,
                                     "remat_policy": "none", "weight_dtype": "bfloat16", "opt_type": "sgd",
                                     # the small table gathered (8 MB), not the tokens resharded by all-to-alls
                                     "use_iota_embed": True,
                                     # the book's FSDP: gradients reduce-scattered beside the backward (libtpu
                                     # all-reduces them whole and synchronously over 64 devices or more)
                                     "gradient_reduction": "reduce_scatter", **(step or {})},
                            "sharding": sharding or {"ici_fsdp_parallelism": -1}}, source="regime")
    topo = parse_topology(spec, slices=slices)
    return summarize(simulate(compile_program(w, topo, check_memory=False), topo, mode="datasheet"))


def test_fsdp_compute_bound_above_the_books_batch(book_cases):
    """Book (training.md): FSDP on v5p over 3 axes is compute-bound when tokens per chip > C / (3 W)
    = 850, communication-bound below, where the weight all-gathers set the step time. (16 layers, so
    the first gather and the last reduction, which nothing can hide, weigh little.)"""
    case = book_cases["training-dp-fsdp-critical-batch-v5p"]
    v5p = get_chip("v5p")
    threshold = v5p.bf16_flops_per_s / v5p.ici_axis_bytes_per_s / 3  # C / (3 W_ici) from the chip catalog
    # The book rounds (its C here is 4.6e14; the spec table's, which the catalog keeps, 4.59e14).
    assert threshold == pytest.approx(float(case["expected"]["per_chip_3axes"]["value"]), rel=0.01)
    above = regime(2 * threshold, layers=16)
    below = regime(threshold / 2, layers=16)
    assert above["exposed_comm_s"] < 0.05 * above["step_time_s"]
    assert below["exposed_comm_s"] > 0.3 * below["step_time_s"]
    assert below["bottleneck"].startswith("communication")
    # Below the threshold the step is the links' time: busy close to 100%.
    assert below["busiest_links"][0]["utilization"] > 0.85


def test_tensor_parallel_limit():
    """Book: TP's communication over compute is Y alpha / (M_Y F) (alpha = C / W_ici, M_Y the torus axes
    it spans), so it is compute-bound while Y < M_Y F / alpha. Our TP collectives sit on the critical
    path without collective matmul, so the ratio shows directly as exposed communication over compute,
    times the ring's exact (Y-1)/Y."""
    from tpusim.model.mesh import resolve_mesh

    alpha = 4.59e14 / 1.8e11
    f = 16384
    for y, spec in ((4, "v5p:4x4x8"), (8, "v5p:4x4x8"), (16, "v5p:4x4x16")):
        sharding = {"ici_tensor_parallelism": y, "ici_fsdp_parallelism": -1}
        s = regime(4096, spec=spec, sharding=sharding, f=f, d=2048, step={"collective_matmul": False})
        ratio = sum(s["exposed_comm_by_kind_s"].values()) / s["compute_s"]
        w = workload_from_dict({"model_name": "llama3-8b", "per_device_batch_size": 1, **sharding}, source="t")
        m_y = len(resolve_mesh(w.parallelism, parse_topology(spec)).axes_of("tensor"))
        book = y * alpha / (m_y * f)
        # Attention projections and elementwise work dilute the MLP's ratio a little.
        assert ratio == pytest.approx(book * (y - 1) / y, rel=0.10), (y, m_y, ratio, book)


def test_dcn_data_parallel_threshold(book_cases):
    """Book: data parallelism across slices over DCN is compute-bound when the per-slice batch exceeds
    C / W_dcn (71,360 tokens with the book's 4.46e14; 73,440 with the table's 4.59e14). Across S slices
    the all-reduce moves (S-1)/S of that: the book's form is the large-S limit."""
    case = book_cases["training-dcn-critical-batch"]
    v5p = get_chip("v5p")
    # The book's 71,360 tokens use C = 4.46e14 (exact, its tolerance says); at the catalog's C (the
    # spec table's 4.59e14) the same W_dcn gives C / W_dcn = 73,440: the catalog's DCN rate is the book's.
    book = float(case["expected"]["B_per_slice"]["value"]) * v5p.bf16_flops_per_s / float(case["inputs"]["C"]["value"])
    assert v5p.bf16_flops_per_s / v5p.dcn_bytes_per_s == pytest.approx(book, rel=1e-9)
    slices = 4
    per_slice = book * (slices - 1) / slices
    chips = 64
    common = dict(spec="v5p:4x4x4", slices=slices, layers=16,
                  sharding={"ici_data_parallelism": -1, "ici_fsdp_parallelism": 1, "dcn_data_parallelism": slices})
    above = regime(2 * per_slice / chips, **common)
    below = regime(per_slice / chips / 2, **common)
    assert above["exposed_comm_s"] < 0.1 * above["step_time_s"]
    assert below["exposed_comm_s"] > 0.3 * below["step_time_s"]
    assert "all-reduce" in below["bottleneck"]


def test_host_offload_moves_saved_activations_over_pcie():
    """Offloading remat policies copy the saved tensors to host after each layer's forward and back
    before its backward; the copies share each direction of the chip's PCIe link. As libtpu schedules
    them, the next layer waits for a copy before it writes the same tensors again: for the input's, Q's, K's
    and V's (one copy, in the order the layer made them) before its projections."""
    topo = parse_topology("v6e:2x4")
    w = small_workload(step={"per_device_batch_size": 2, "max_target_length": 1024,
                               "remat_policy": "custom", **RECIPES_CUSTOM})
    prog = compile_program(w, topo)
    out = [o for o in prog.host_ops if o.category == "copy-to-host"]
    back = [o for o in prog.host_ops if o.category == "copy-from-host"]
    layers = w.model.num_layers
    assert len(back) == layers and len(out) == 2 * layers
    tok, d = 2 * 1024 * 8 / 8, 2048  # fsdp over 8 chips: 2 sequences each
    assert [o.bytes for o in out[:2]] == pytest.approx([2 * tok * 4 * d, 2 * tok * d])  # input, q, k, v (MHA); o
    assert back[0].bytes == pytest.approx(2 * tok * (d + 3 * d + d))  # all five back, in bf16
    result = simulate(prog, topo, mode="datasheet")
    df = timeline_frame(result)
    pcie = df[df.stream == "PCIe"]
    assert len(pcie) == 3 * layers
    xla_ops = df[df.stream == "XLA Ops"]
    for o in out[::2][:-1]:  # the next layer's first projection starts once the copy is done
        q_proj = next(x for x in prog.ops if x.layer == o.layer + 1 and x.name.endswith("fwd/q_proj"))
        assert xla_ops[xla_ops.op_index == q_proj.index].start_s.iloc[0] >= \
            df[(df.op_index == o.index) & (df.stream == "PCIe")].end_s.iloc[0]
    assert result.link_stats["PCIe d2h"]["bytes"] == pytest.approx(sum(o.bytes for o in out))
    # Each copy alone takes bytes / PCIe rate (3.2e10 B/s on v6e) or longer when they queue.
    assert ((pcie.end_s - pcie.start_s) >= pcie.bytes / 3.2e10 * (1 - 1e-9)).all()
    # Every backward layer starts after its activations are back.
    for o in back:
        first_bwd = next(x for x in prog.ops if x.layer == o.layer and x.phase == "backward" and x.stream == "compute")
        assert df[(df.op_index == first_bwd.index) & (df.stream == "XLA Ops")].start_s.iloc[0] >= \
            df[(df.op_index == o.index) & (df.stream == "PCIe")].end_s.iloc[0]


# ---- across slices: the cross-slice gradient reduction as XLA schedules it ---------------------------

def _read_gz(path):
    import gzip

    return gzip.decompress(path.read_bytes()).decode()


def test_xla_pipelines_the_cross_slice_gradient_all_reduce():
    """libtpu's multi-slice compile of a scanned model (traces/aot_multislice.py, 2 v5e 4x4 slices): each
    layer's gradient shard (bf16, 1/16 of a weight) is all-reduced across slices by megascale host
    transfers issued at the start of the next backward iteration and waited for at its end, after the
    iteration's ICI reduction; the last layer's after the loop."""
    import re
    from pathlib import Path

    text = _read_gz(Path(__file__).resolve().parent.parent / "traces" / "xla_aot" / "multislice_scan_L4"
                    / "optimized_hlo.txt.gz")
    bodies = re.split(r"\n(?=%\S+ \(|ENTRY )", text)
    with_dcn = [b for b in bodies if '_xla_megascale_transfer_type="ALL_REDUCE"' in b]
    assert len(with_dcn) == 2 and with_dcn[-1].startswith("ENTRY")  # the loop body, and after the loop
    body = with_dcn[0]
    lines = body.splitlines()
    first = lambda word: next(i for i, ln in enumerate(lines) if word in ln)
    last = lambda word: max(i for i, ln in enumerate(lines) if word in ln)
    assert last(" send(") < first(" all-reduce(") < first(" send-done(")  # issued before, waited after
    assert first(" recv-done(") > first("convolution")  # the layer's matmuls run in between
    # What crosses slices: bf16[256,8,128], 1024 x 4096 / 16 elements, the layer gradient's FSDP shard.
    assert re.search(r"%send\.\d+ = \(bf16\[256,8,128\]", body)


def test_compiled_program_waits_for_the_previous_layers_cross_slice_reduction():
    """Our program: the cross-slice all-reduces of backward layer l are waited for by the first op after
    layer l-1's backward (and all by the optimizer); in the simulation no backward layer l-2 starts
    before layer l's cross-slice reductions end."""
    topo = parse_topology("v5e:4x4", slices=2)
    w = small_workload(sharding={"ici_fsdp_parallelism": -1, "dcn_data_parallelism": 2})
    prog = compile_program(w, topo, check_memory=False)
    dcn = [o for o in prog.ops if o.stream == COLLECTIVE and "dcn" in o.axes]
    layers = w.model.num_layers
    assert {o.layer for o in dcn} == set(range(-1, layers))
    result = simulate(prog, topo, mode="calibrated")
    df = timeline_frame(result)
    ends = df[df.stream == "Async XLA Ops"].set_index("op_index").end_s
    starts = df[df.stream == "XLA Ops"].groupby("op_index").start_s.min()
    for layer in range(2, layers):
        waited = [o.index for o in dcn if o.layer == layer]
        first_next = min(o.index for o in prog.ops if o.stream == COMPUTE and o.layer == layer - 2
                         and o.phase == "backward")
        assert starts[first_next] >= max(ends[i] for i in waited) - 1e-12
        after = next(o for o in prog.ops if o.stream == COMPUTE and o.index > max(
            x.index for x in prog.ops if x.stream == COMPUTE and x.layer == layer - 1 and x.phase == "backward"))
        assert set(waited) <= set(after.deps)


def test_slow_dcn_paces_the_backward_pass():
    """With DCN 1000x oversubscribed, the cross-slice reductions cannot hide: the NIC is busy exactly its
    bytes over its rate, and the step lasts at least from the first reduction's start through all of them."""
    topo = parse_topology("v5e:4x4", slices=2, dcn_oversubscription=1000)
    w = small_workload(sharding={"ici_fsdp_parallelism": -1, "dcn_data_parallelism": 2})
    result = simulate(compile_program(w, topo, check_memory=False), topo, mode="datasheet")
    nic = result.link_stats["DCN"]
    assert nic["busy_s"] == pytest.approx(nic["bytes"] / nic["bytes_per_s"], rel=1e-6)
    df = timeline_frame(result)
    first = df[df.stream == "DCN"].start_s.min()
    assert result.step_time_s >= first + nic["busy_s"] * (1 - 1e-9)
    fast = simulate(compile_program(w, parse_topology("v5e:4x4", slices=2), check_memory=False),
                    parse_topology("v5e:4x4", slices=2), mode="datasheet")
    assert result.step_time_s > 1.5 * fast.step_time_s


# ---- tensor parallelism as XLA schedules it ----------------------------------------------------------

def test_tensor_parallel_collectives_sit_on_the_critical_path_as_in_xla():
    """libtpu's compile of FSDP x TP (traces/xla_aot/fsdp_tp_L4, default flags): every tensor-parallel
    activation all-reduce is synchronous (no async start/done, no windowed-einsum loop: no collective
    matmul), while the FSDP weight all-gathers are asynchronous. Our program does the same: each
    tensor-parallel collective is waited for by the next compute op (nothing hides it), each FSDP weight
    gather is issued a layer ahead, with compute between its issue and its first use."""
    from pathlib import Path

    from tpusim.api import compile_workload
    from tpusim.compiler.hlo.collectives import extract_collectives

    case = Path(__file__).resolve().parent.parent / "traces" / "xla_aot" / "fsdp_tp_L4"
    xla = extract_collectives(_read_gz(case / "optimized_hlo.txt.gz"))["collectives"]
    tp = [c for c in xla if c["kind"] == "all-reduce" and c["group_size"] == 4
          and c["operand_shapes"] == ["bf16[2,512,512]"]]
    assert len(tp) == 4 * 4 + 1  # 4 per layer (2 forward, 2 backward) and the unembedding's
    assert not any(c["async"] or c["in_while"] for c in tp)
    weights = [c for c in xla if c["kind"] == "all-gather" and "layer_" in c["op_name"]
               and "jvp(layer_0)/" not in c["op_name"]]  # layer 0's forward has nothing to hide behind
    assert len(weights) >= 7 * 6 and all(c["async"] for c in weights)

    prog = compile_workload(case / "config.yaml")[2]
    compute = [o for o in prog.ops if o.stream == COMPUTE]
    position = {o.index: k for k, o in enumerate(compute)}
    first_waiter = {}
    for o in compute:
        for d in o.deps:
            first_waiter.setdefault(d, o)
    for op in prog.collective_ops:
        issued_after = max((position[d] for d in op.deps if d in position), default=-1)
        waited_at = position[first_waiter[op.index].index]
        if op.mesh_axes == ("tensor",):
            assert waited_at == issued_after + 1, op.name  # on the critical path
        elif op.category == "all-gather" and op.layer > 0:
            assert waited_at > issued_after + 1, op.name  # prefetched behind compute


def test_tensor_parallel_stays_synchronous_with_the_v5p_runs_flags():
    """The same at 32 MB per activation collective and with the MaxText v5p 32B run's LIBTPU flags (async
    collective fusion, compute-collective overlap: traces/aot_tp_flags.py): XLA still all-reduces the
    tensor-parallel activations synchronously, with no windowed-einsum loop; only FSDP traffic is
    asynchronous. So charging tensor-parallel collectives on the critical path is what XLA does."""
    from pathlib import Path

    from tpusim.compiler.hlo.collectives import extract_collectives

    case = Path(__file__).resolve().parent.parent / "traces" / "xla_aot" / "fsdp_tp_v5pflags_big_L2"
    found = extract_collectives(_read_gz(case / "optimized_hlo.txt.gz"))
    tp = [c for c in found["collectives"] if c["kind"] == "all-reduce" and c["operand_shapes"] == ["bf16[2,2048,4096]"]]
    assert len(tp) == 2 * 4 + 1 and not any(c["async"] or c["in_while"] for c in tp)
    assert not found["windowed_einsum_loops"]
    fsdp = [c for c in found["collectives"] if c["kind"] in ("all-gather", "collective-permute") and c["async"]]
    assert len(fsdp) > 50
