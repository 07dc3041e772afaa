"""Pallas splash-attention kernels in XLA's HLO are priced as tpusim's own flash attention op
(tpusim/compiler/hlo/splash.py); other Pallas kernels stay copies, by their bytes alone."""

from __future__ import annotations

import functools

import pytest
from conftest import REPO

from tpusim.compiler.hlo.importer import import_hlo, read_hlo
from tpusim.sim.topology import parse_topology

# MaxText v4 22B (workloads/measured/maxtext_v4_22b.yaml): 13 sequences of T 2048 per device, 24 heads of 128.
L, T, N, H, TOK = 48, 2048, 24, 128, 13 * 2048


@functools.cache
def _v4_hlo_program():
    return import_hlo(read_hlo(REPO / "traces" / "xla_aot_memory" / "v4_22b_full.hlo.txt.gz"),
                      parse_topology("v4:4x4x4"))


@functools.cache
def _v4_analytic_program():
    from tpusim.api import workload_and_topology
    from tpusim.compiler import compile_program

    w, topo = workload_and_topology(REPO / "workloads" / "measured" / "maxtext_v4_22b.yaml")
    return compile_program(w, topo)


def test_v4_22b_splash_flops_per_layer_are_tpusims_attention_flops():
    """libtpu's full-size v4 22B step runs, per layer, the splash forward (and again in the backward's
    remat recompute), the dkv and the dq kernels: 2 + 2 + 4 + 3 matmuls of 2 tok T N H, each over the
    (n + 1) / 2n = 5/8 of the T x T grid that 512-blocks of a causal mask compute at T = 2048 (its block
    mask is printed as an elided constant, so causal is assumed and noted). Per layer the kernels'
    MXU FLOPs and VPU ops are tpusim's analytic attention op's for the same workload (budget 1%: the
    issue's FLOP budget)."""
    kernels = [o for o in _v4_hlo_program().ops if "splash_mha" in o.name]
    assert kernels and all(o.category == "attention" for o in kernels)
    per_layer = sum(o.flops for o in kernels) / L
    one_matmul = 2 * TOK * T * N * H * 5 / 8
    assert per_layer == pytest.approx((2 + 2 + 4 + 3) * one_matmul, rel=0.01)
    by_kind = {kind: sum(o.flops for o in kernels if f"splash_mha_{kind}_" in o.name) / L
               for kind in ("fwd", "dkv", "dq")}
    assert by_kind == pytest.approx({"fwd": 4 * one_matmul, "dkv": 4 * one_matmul, "dq": 3 * one_matmul}, rel=0.01)
    ours = [o for o in _v4_analytic_program().ops if o.category == "attention"]
    assert per_layer == pytest.approx(sum(o.flops for o in ours) / L, rel=0.01)
    assert sum(o.vpu_flops for o in kernels) == pytest.approx(sum(o.vpu_flops for o in ours), rel=0.01)
    assert {o.mxu_shape for o in kernels} == {(TOK, H, T)} == {o.mxu_shape for o in ours}
    assert {o.phase for o in kernels if "_dkv_" in o.name or "_dq_" in o.name} == {"backward"}
    assert any("causal mask is assumed" in n and "62.5%" in n for n in _v4_hlo_program().notes)


def _module(kernel: str = "splash_mha_fwd_residuals", mask: str = "{ { {1, 0}, {1, 1} } }", *,
            target: str = "tpu_custom_call", meta: str = r'{\"block_q\": 512, \"block_kv\": 512}',
            results: str = "(bf16[2,4,1024,128]{3,2,1,0}, f32[2,4,1024,128]{3,2,1,0})",
            op_name: str = "jit(f)/jvp()/{k}/{k}/pallas_call", via_loop: bool = False) -> str:
    """A one-kernel module: q, k, v of 2 sequences x 4 heads x T 1024 x 128 and a 2 x 2 block mask
    (512-blocks), its kernel_metadata printed over three lines as XLA prints it. ``via_loop``: the mask
    is a constant carried into a while loop's state, copied to VMEM and read in the body, as
    MaxText's scanned layers do."""
    arr = "bf16[2,4,1024,128]{3,2,1,0}"
    call = (f"custom-call(%data_next, %block_mask, %q, %k, %v), custom_call_target=\"{target}\", "
            "frontend_attributes={kernel_metadata={\n"
            f"\"xprof_metadata\":\"{meta}\"\n"
            f"}}}}, metadata={{op_name=\"{op_name.format(k=kernel)}\"}}\n")
    if not via_loop:
        return ("HloModule m, num_partitions=1\n\n"
                f"ENTRY %main (q: {arr}, k: {arr}, v: {arr}) -> {results} {{\n"
                f"  %q = {arr} parameter(0)\n  %k = {arr} parameter(1)\n  %v = {arr} parameter(2)\n"
                "  %data_next = s8[1,2,2]{2,1,0} constant({ { {0, 0}, {0, 1} } })\n"
                f"  %block_mask = s8[1,2,2]{{2,1,0}} constant({mask})\n"
                f"  ROOT %{kernel}.1 = {results} " + call + "}\n")
    state = f"(s32[], s8[1,2,2], {arr})"
    return ("HloModule m, num_partitions=1\n\n"
            f"%body (p: {state}) -> {state} {{\n"
            f"  %p = {state} parameter(0)\n"
            "  %i = s32[] get-tuple-element(%p), index=0\n"
            "  %one = s32[] constant(1)\n"
            "  %next = s32[] add(%i, %one)\n"
            "  %m = s8[1,2,2]{2,1,0} get-tuple-element(%p), index=1\n"
            f"  %q = {arr} get-tuple-element(%p), index=2\n"
            "  %copy-start = (s8[1,2,2]{2,1,0:S(3)}, s8[1,2,2]{2,1,0}, u32[]{:S(2)}) copy-start(%m)\n"
            "  %block_mask = s8[1,2,2]{2,1,0:S(3)} copy-done(%copy-start)\n"
            "  %data_next = s8[1,2,2]{2,1,0} constant({ { {0, 0}, {0, 1} } })\n"
            "  %k = bf16[2,4,1024,128]{3,2,1,0} copy(%q)\n  %v = bf16[2,4,1024,128]{3,2,1,0} copy(%q)\n"
            f"  %{kernel}.1 = {results} " + call +
            f"  %o = {arr} get-tuple-element(%{kernel}.1), index=0\n"
            f"  ROOT %t = {state} tuple(%next, %m, %o)\n"
            "}\n\n"
            f"%cond (c: {state}) -> pred[] {{\n"
            f"  %c = {state} parameter(0)\n"
            "  %j = s32[] get-tuple-element(%c), index=0\n"
            "  %three = s32[] constant(3)\n"
            "  ROOT %lt = pred[] compare(%j, %three), direction=LT\n"
            "}\n\n"
            f"ENTRY %main (q: {arr}) -> {state} {{\n"
            f"  %q = {arr} parameter(0)\n"
            "  %zero = s32[] constant(0)\n"
            f"  %mask = s8[1,2,2]{{2,1,0}} constant({mask})\n"
            f"  %init = {state} tuple(%zero, %mask, %q)\n"
            f"  ROOT %w = {state} while(%init), condition=%cond, body=%body\n"
            "}\n")


FULL_GRID = 2 * 2 * 4 * 1024 * 1024 * (128 + 128)  # QK^T and PV over the whole 1024 x 1024 grid of 8 heads
ONE = parse_topology("v5e:1x1")


def _kernel_op(text: str):
    prog = import_hlo(text, ONE)
    return next(o for o in prog.ops if "splash" in o.name or "kernel" in o.name), prog


@pytest.mark.parametrize("via_loop", [False, True], ids=["constant", "loop_state"])
def test_a_readable_block_mask_gives_the_blocks_computed(via_loop):
    """A mask whose literal the HLO prints is counted: a block-diagonal mask over 2 x 2 blocks computes
    half the grid (a causal one would be 3/4). Through a while loop's state too (loop-invariant)."""
    op, prog = _kernel_op(_module(mask="{ { {1, 0}, {0, 2} } }", via_loop=via_loop))
    assert op.category == "attention"
    assert op.flops == pytest.approx(FULL_GRID / 2)
    assert op.vpu_flops == pytest.approx(6 * 2 * 4 * 1024 * 1024 / 2)  # FLASH_VPU_OPS_FWD per score computed
    assert op.mxu_shape == (2 * 1024, 128, 1024)
    assert any("block mask's non-zero blocks" in n and "50.0%" in n for n in prog.notes)
    causal, _ = _kernel_op(_module(via_loop=via_loop))  # [[1, 0], [1, 1]]: (n + 1) / 2n at n = 2
    assert causal.flops == pytest.approx(FULL_GRID * 3 / 4)


def test_a_mask_the_loop_changes_is_not_read_as_a_constant():
    """If the loop body writes the mask's state element, the constant that started the loop is not the
    mask the kernel reads: causal is assumed (3/4 of the grid here), not the constant's 1/2."""
    text = _module(mask="{ { {1, 0}, {0, 2} } }", via_loop=True).replace("tuple(%next, %m, %o)",
                                                                          "tuple(%next, %block_mask, %o)")
    op, prog = _kernel_op(text)
    assert op.flops == pytest.approx(FULL_GRID * 3 / 4)
    assert any("causal mask is assumed" in n for n in prog.notes)


def test_an_elided_block_mask_is_taken_as_causal():
    """XLA prints a larger constant as ``{...}``: the kernel computes a causal mask's blocks, counted as
    tpusim's compiler counts them (Model.flash_fraction: (n + 1) / 2n), and the program says so."""
    op, prog = _kernel_op(_module(mask="{...}"))
    assert op.flops == pytest.approx(FULL_GRID * 3 / 4)
    assert any("causal mask is assumed" in n and "75.0%" in n for n in prog.notes)


def test_backward_kernels_count_their_matmuls_and_blocks():
    """dq: 3 matmuls, dkv: 4, each over its own block sizes (256-blocks: (4 + 1) / 8 of the grid when
    causal); a dkv kernel with a dq result a rank above q is the fused backward: 5. Their op_name
    (``transpose(jvp())``) makes them backward ops, read from the metadata after the kernel's
    multi-line attributes."""
    bwd = "jit(f)/transpose(jvp())/{k}/{k}/pallas_call"
    dq, _ = _kernel_op(_module("splash_mha_dq_no_residuals", "{...}", op_name=bwd,
                               meta=r'{\"block_q_dq\": 256, \"block_kv_dq\": 256}'))
    assert dq.phase == "backward"
    assert dq.flops == pytest.approx(FULL_GRID / 2 * 3 * 5 / 8)
    assert dq.vpu_flops == pytest.approx(6 * 2 * 4 * 1024 * 1024 * 5 / 8)
    dkv, _ = _kernel_op(_module("splash_mha_dkv_no_residuals", "{...}", op_name=bwd,
                                meta=r'{\"block_q_dkv\": 512, \"block_kv_dkv\": 512}'))
    assert dkv.flops == pytest.approx(FULL_GRID / 2 * 4 * 3 / 4)
    assert dkv.vpu_flops == pytest.approx(7 * 2 * 4 * 1024 * 1024 * 3 / 4)
    fused, _ = _kernel_op(_module("splash_mha_dkv_no_residuals", "{...}", op_name=bwd,
                                  meta=r'{\"block_q_dkv\": 512, \"block_kv_dkv\": 512}',
                                  results="(bf16[2,2,4,1024,128]{4,3,2,1,0}, bf16[2,4,1024,128]{3,2,1,0}, "
                                          "bf16[2,4,1024,128]{3,2,1,0})"))
    assert fused.flops == pytest.approx(FULL_GRID / 2 * 5 * 3 / 4)


def test_an_unknown_pallas_kernel_is_still_a_copy():
    """A tpu_custom_call tpusim does not know (not splash attention) is priced by its HBM bytes alone,
    as before, and the program names it; a custom call of another target is untouched."""
    op, prog = _kernel_op(_module("my_kernel"))
    assert (op.category, op.flops, op.vpu_flops, op.mxu_shape) == ("copy", 0.0, 0.0, None)
    assert op.hbm_bytes > 3 * 2 * 4 * 1024 * 128 * 2  # q, k, v and the results
    assert any("tpusim does not know" in n and "my_kernel (x1)" in n for n in prog.notes)
    other, prog = _kernel_op(_module(target="SomeOtherTarget"))
    assert (other.category, other.flops) == ("copy", 0.0)
    assert not any("splash" in n or "Pallas" in n for n in prog.notes)


def test_a_kernel_with_absurd_blocks_is_one_clear_error():
    """One-row blocks over a sequence of 2^25 would be counted over 33 million query blocks: refused
    with a message naming the kernel's blocks (exit status 2 from the CLI), not left to run out of memory."""
    from tpusim.errors import TpusimError

    arr = "bf16[1,1,33554432,1]{3,2,1,0}"
    text = (_module(mask="{...}", meta=r'{\"block_q\": 1, \"block_kv\": 1}')
            .replace("bf16[2,4,1024,128]{3,2,1,0}", arr).replace("bf16[2,4,1024,128]", arr)
            .replace("f32[2,4,1024,128]{3,2,1,0}", "f32[1]{0}"))
    with pytest.raises(TpusimError, match="query blocks"):
        import_hlo(text, ONE)
