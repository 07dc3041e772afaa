"""The HLO importer: real compiled programs (libtpu's, and the v6e capture's) become Programs whose
FLOPs, collectives and host copies are what XLA wrote."""

from __future__ import annotations

import json

import pytest

from tpusim.sim.engine import simulate
from tpusim.errors import TpusimError
from tpusim.compiler.hlo.importer import group_axes, import_hlo, read_hlo, replica_groups
from tpusim.sim.program import COLLECTIVE, HOST
from tpusim.sim.topology import parse_topology

from conftest import REAL_TRACES, REPO

AOT = REPO / "traces" / "xla_aot"
V6E_HLO = REAL_TRACES / "tpu-v6e-host-offload" / "hlo"
INDEX = json.loads((AOT / "index.json").read_text())["cases"]


@pytest.mark.parametrize("case", ["fsdp_no_windowed_einsum_L2", "fsdp_no_windowed_einsum_L4",
                                  "fsdp_remat_no_windowed_einsum_L2", "fsdp_tp_L2", "fsdp_tp_L4"])
def test_flops_match_xla_cost_analysis(case):
    """Convolutions counted over the input they really touch (XLA TPU writes GQA einsums as padded,
    dilated convolutions): within 2% of XLA's own count, which also counts elementwise ops its way."""
    prog = import_hlo(read_hlo(AOT / case / "optimized_hlo.txt.gz"), parse_topology("v5e:4x4"))
    name, L = case.rsplit("_L", 1)
    xla = INDEX[name][f"L{L}"]["flops"]
    assert prog.flops_per_device == pytest.approx(xla, rel=0.02)


def test_matmul_flops_are_exactly_the_einsums():
    """The dot/convolution FLOPs of the 2-layer FSDP step equal the traced einsums' (hand count:
    24.16 GFLOP of weight matmuls and 3.22 of attention per layer, plus the unembedding)."""
    from tpusim.compiler.hlo.importer import _matmul_flops
    from tpusim.compiler.hlo.parse import parse_module
    from tpusim.compiler.hlo.analysis import _Analysis

    mod = parse_module(read_hlo(AOT / "fsdp_no_windowed_einsum_L2" / "optimized_hlo.txt.gz"))
    an = _Analysis(mod)
    matmul = sum(_matmul_flops(i, an)[0] for i in mod.by_name.values() if i.opcode in ("dot", "convolution"))
    tok, d, n, k, h, f, t, v = 1024, 512, 8, 4, 64, 2048, 512, 8192
    per_layer = 3 * 2 * tok * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + 3 * 4 * 2 * t * t * n * h
    assert matmul == pytest.approx(2 * per_layer + 3 * 2 * tok * d * v, rel=1e-9)


@pytest.mark.parametrize("case", ["fsdp_L2", "fsdp_tp_L4", "fsdp_remat_L2", "fsdp_no_windowed_einsum_L4"])
def test_collectives_are_xlas(case):
    """One collective op per execution of each logical collective XLA emitted (loops unrolled)."""
    prog = import_hlo(read_hlo(AOT / case / "optimized_hlo.txt.gz"), parse_topology("v5e:4x4"))
    summary = json.loads((AOT / case / "summary.json").read_text())
    for kind, c in summary["counts_by_kind"].items():
        ours = [o for o in prog.ops if o.stream == COLLECTIVE and o.category == kind]
        assert len(ours) == c["executed"], kind
        field = "executed_result_bytes" if kind == "all-gather" else "executed_operand_bytes"
        assert sum(o.bytes for o in ours) == c[field], kind
    # Every collective is waited for and runs over real axes of the slice.
    waited = {d for o in prog.ops for d in o.deps}
    assert all(o.index in waited for o in prog.ops if o.stream == COLLECTIVE)


def test_fsdp_all_gathers_span_the_whole_slice():
    prog = import_hlo(read_hlo(AOT / "fsdp_L2" / "optimized_hlo.txt.gz"), parse_topology("v5e:4x4"))
    big = [o for o in prog.ops if o.category == "all-gather" and o.bytes >= 1 << 19]
    assert big and all(len(o.axes) == 2 for o in big)  # 16 devices = both axes of the 4x4


def test_host_offload_copies_of_the_v6e_capture():
    """jit_f copies three 5.37 GB arrays in from host memory and three out (memory space S(5))."""
    topo = parse_topology("v6e:2x2")
    prog = import_hlo(read_hlo(V6E_HLO / "jit_f.hlo.txt"), topo)
    copies = [o for o in prog.ops if o.stream == HOST]
    assert sorted(o.category for o in copies) == ["copy-from-host"] * 3 + ["copy-to-host"] * 3
    assert all(o.bytes == 5 * 1024 * 1024 * 256 * 4 for o in copies)
    fusions = [o for o in prog.ops if o.name.startswith("broadcast_add_fusion")]
    assert len(fusions) == 3 and all(o.hbm_bytes == 2 * 5368709120 for o in fusions)
    result = simulate(prog, topo, mode="datasheet")
    # Each direction of PCIe moves 3 x 5.37 GB at 3.2e10 B/s; copies in and out overlap.
    assert result.step_time_s == pytest.approx(3 * 5368709120 / 3.2e10 + 5368709120 / 3.2e10, rel=0.05)


def test_replica_groups_to_axes():
    topo = parse_topology("v5e:4x4")
    assert replica_groups("{{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("{}", 3) == [[0, 1, 2]]
    assert group_axes(topo, list(range(16)), 16) == ("x", "y")
    assert group_axes(topo, [0, 1, 2, 3], 16) == ("y",)       # row-major ids: y varies fastest
    assert group_axes(topo, [0, 4, 8, 12], 16) == ("x",)
    # XLA's mesh form: ids row-major over the mesh axes, a group differs only along the listed ones.
    assert replica_groups("mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_0'}", 4) == [[0, 2], [1, 3]]
    assert replica_groups("mesh['axis_0'=4,'axis_1'=1,'axis_2'=4,'axis_3'=1] {'axis_3','axis_2'}", 16) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert replica_groups("mesh['axis_0'=16,'axis_1'=1] {'axis_0'}", 16) == [list(range(16))]


def test_mesh_form_groups_are_the_meshs_rows():
    """libtpu's v6e FSDP 4 x tensor 4 compile (traces/xla_aot_chips_maxtext/v6e) writes 9 tensor-parallel
    activation all-reduces (16.8 MB each: 8 in the layers, 1 of the unembedding's input gradient) with
    mesh-form replica groups: each runs over the 4 devices of a tensor row (one torus axis), as the
    embedding's iota-form all-reduce ``[4,4]<=[16]`` of the same size does, not over all 16 devices."""
    case = REPO / "traces" / "xla_aot_chips_maxtext" / "v6e" / "big_fsdp_tp_L2"
    prog = import_hlo(read_hlo(case / "optimized_hlo.txt.gz"), parse_topology("v6e:4x4"))
    tp = [o for o in prog.ops if o.category == "all-reduce" and o.bytes == 4 * 1024 * 2048 * 2]
    assert len(tp) == 10 and {o.axes for o in tp} == {("x",)}  # ids 4r..4r+3: x, as libtpu numbers devices


def test_device_ids_are_libtpus():
    """libtpu numbers a slice's devices with the first torus axis fastest (its ahead-of-time v5p 2x2x4:
    device 1 at (1, 0, 0), device 2 at (0, 1, 0), device 4 at (0, 0, 1)): on an asymmetric slice a group
    of devices 0 and 4 runs along z (4 chips), not along y."""
    from tpusim.compiler.hlo.importer import group_axes, xla_chip

    topo = parse_topology("v5p:2x2x4")
    to_chip = xla_chip(topo, 16)
    assert [topo.coords(to_chip(d))[1] for d in (1, 2, 4)] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    assert group_axes(topo, [to_chip(d) for d in (0, 4, 8, 12)], 16) == ("z",)
    assert group_axes(topo, [to_chip(d) for d in (0, 1)], 16) == ("x",)


def test_bad_hlo(tmp_path):
    p = tmp_path / "x.hlo.txt"
    p.write_text("this is not HLO\n")
    with pytest.raises(TpusimError, match="not HLO text"):
        read_hlo(p)
    with pytest.raises(TpusimError, match="file not found"):
        read_hlo(tmp_path / "missing.txt")


def test_plain_collectives_sharing_a_channel_id_are_separate():
    """jax's shard_map collectives may all carry channel_id=1 (traces/aot_context.py): each plain
    collective is one instruction, so two of them are two logical collectives; async collective
    fusion clones still group by channel (and, in newer XLA, by their chain_id)."""
    from tpusim.compiler.hlo.collectives import extract_collectives

    text = """HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p: f32[8,128], q: f32[8,128]) -> (f32[2,128], f32[2,128]) {
  %p = f32[8,128]{1,0} parameter(0)
  %q = f32[8,128]{1,0} parameter(1)
  %rs.1 = f32[2,128]{1,0} reduce-scatter(%p), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
  %rs.2 = f32[2,128]{1,0} reduce-scatter(%q), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
  ROOT %t = (f32[2,128]{1,0}, f32[2,128]{1,0}) tuple(%rs.1, %rs.2)
}
"""
    colls = extract_collectives(text)["collectives"]
    assert [(c["kind"], c["operand_bytes"]) for c in colls] == [("reduce-scatter", 4096), ("reduce-scatter", 4096)]


def _prefetch_module(end_of_program: bool) -> str:
    """A table prefetched into VMEM across programs (``cross_program_prefetch_index``), read by a gather,
    and optionally prefetched again before the program ends (XLA's end-of-program prefetch)."""
    again = ("  %copy-start.1 = (bf16[4000,4096]{1,0:T(8,128)(2,1)S(1)}, bf16[4000,4096]{1,0:T(8,128)(2,1)}, "
             "u32[]{:S(2)}) copy-start(%param.1)\n"
             "  %copy-done.1 = bf16[4000,4096]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)\n"
             if end_of_program else "")
    return ("HloModule m, num_partitions=1\n\n"
            "ENTRY %main (param.1: bf16[4000,4096], x: bf16[64,4096]) -> bf16[64,4096] {\n"
            "  %param.1 = bf16[4000,4096]{1,0:T(8,128)(2,1)} parameter(0)\n"
            "  %x = bf16[64,4096]{1,0:T(8,128)(2,1)} parameter(1)\n"
            "  %copy-start = (bf16[4000,4096]{1,0:T(8,128)(2,1)S(1)}, bf16[4000,4096]{1,0:T(8,128)(2,1)}, "
            "u32[]{:S(2)}) copy-start(%param.1), cross_program_prefetch_index=0\n"
            "  %y = bf16[64,4096]{1,0:T(8,128)(2,1)} add(%x, %x)\n"
            "  %copy-done = bf16[4000,4096]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)\n"
            "  %z = bf16[64,4096]{1,0:T(8,128)(2,1)} multiply(%y, %y)\n"
            + again +
            "  ROOT %w = bf16[64,4096]{1,0:T(8,128)(2,1)} add(%z, %y)\n"
            "}\n")


def test_cross_program_prefetch_is_paid_once_per_step():
    """A step run in a loop: XLA's cross-program prefetch of a parameter into VMEM at the program's start
    is, with its end-of-program refetch, already in place when the step begins; only the refetch moves
    bytes. Without a refetch the start's prefetch is paid (traces/xla_aot_serving: the embedding table)."""
    from tpusim.compiler.hlo.importer import import_hlo

    topo = parse_topology("v5e:1x1")
    table = 4000 * 4096 * 2
    once = sum(o.hbm_bytes for o in import_hlo(_prefetch_module(True), topo).ops)
    single = sum(o.hbm_bytes for o in import_hlo(_prefetch_module(False), topo).ops)
    assert once == pytest.approx(single)  # one table's worth either way
    assert single > table  # (the adds read and write their own bytes too)


def test_an_async_dma_fills_the_idle_hbm_of_mxu_bound_ops_first():
    """XLA streams buffers into VMEM while the TensorCore works: the DMA's bytes go to the ops in flight
    that leave HBM idle (an MXU-bound matmul) before any op pays for them; shared equally, an HBM-bound
    add would carry half and the step would be longer than the hardware's."""
    from tpusim.compiler.hlo.importer import import_hlo
    from tpusim.sim.costmodel import compute_params

    text = ("HloModule m, num_partitions=1\n\n"
            "ENTRY %main (w: bf16[512,1024], a: bf16[1024,1024], b: bf16[1024,1024]) -> bf16[1024,1024] {\n"
            "  %w = bf16[512,1024]{1,0:T(8,128)(2,1)} parameter(0)\n"
            "  %a = bf16[1024,1024]{1,0:T(8,128)(2,1)} parameter(1)\n"
            "  %b = bf16[1024,1024]{1,0:T(8,128)(2,1)} parameter(2)\n"
            "  %copy-start = (bf16[512,1024]{1,0:T(8,128)(2,1)S(1)}, bf16[512,1024]{1,0:T(8,128)(2,1)}, "
            "u32[]{:S(2)}) copy-start(%w)\n"
            "  %d = bf16[1024,1024]{1,0:T(8,128)(2,1)} dot(%a, %b), lhs_contracting_dims={1}, "
            "rhs_contracting_dims={0}\n"
            "  %e = bf16[1024,1024]{1,0:T(8,128)(2,1)} add(%d, %a)\n"
            "  %copy-done = bf16[512,1024]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)\n"
            "  ROOT %f = bf16[1024,1024]{1,0:T(8,128)(2,1)} add(%e, %b)\n"
            "}\n")
    topo = parse_topology("v5e:1x1")
    ops = {o.name: o for o in import_hlo(text, topo).ops}
    dma = 512 * 1024 * 2
    assert ops["d"].hbm_bytes == pytest.approx(3 * 1024 * 1024 * 2 + dma)  # the matmul's own bytes and the DMA
    assert ops["e"].hbm_bytes == pytest.approx(3 * 1024 * 1024 * 2)       # the add pays nothing
    cp = compute_params(topo.chip, "calibrated")
    assert ops["d"].flops / cp.mxu_flops_per_s >= ops["d"].hbm_bytes / cp.hbm_bytes_per_s  # still MXU-bound
