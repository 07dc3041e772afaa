"""The collective model against the book's closed forms (datasheet mode) and measured curves (calibrated)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tpusim.sim.collectives import collective_time, link_params, lower, parse_axes
from tpusim.errors import TpusimError
from tpusim.sim.topology import parse_topology, replace

from conftest import value


def t_ds(kind, v, spec, axes, slices=1):
    topo = parse_topology(spec, slices=slices)
    return collective_time(lower(kind, v, topo, parse_axes(axes, topo)), link_params(topo, "datasheet"))


# ---- the book's closed forms, bandwidth-bound (datasheet mode) ------------------------------------

@pytest.mark.parametrize("spec, axis, x", [("v5e:16x16", "x", 16), ("v5p:4x4x8", "z", 8), ("v5p:4x4x4", "x", 4)])
def test_ring_all_gather_is_V_over_W(spec, axis, x):
    """Book: AG on a bidirectional ring takes V / W_ici; exactly (X-1)/X * V / W_ici (its large-X form)."""
    topo = parse_topology(spec)
    w = topo.chip.ici_axis_bytes_per_s
    v = 1e9
    t = t_ds("all-gather", v, spec, axis)
    assert t == pytest.approx((x - 1) / x * v / w, rel=1e-12)
    assert t_ds("reduce-scatter", v, spec, axis) == pytest.approx(t, rel=1e-12)
    assert t_ds("all-reduce", v, spec, axis) == pytest.approx(2 * t, rel=1e-12)  # AR = RS + AG


def test_no_wraparound_worked_example():
    """Book (sharding.md): AG of bf16[2048, 8192] over a 4-long v5e axis with no wraparound:
    (X-1) * (V/X) / W_one_way = 560 us. The book's ring figure (373 us) is V/W; the exact ring is
    (X-1)/X of it, so the line is exactly twice the ring (the book's "typically doubles")."""
    v = 2 * 2048 * 8192
    line = t_ds("all-gather", v, "v5e:4x4", "x")
    assert line == pytest.approx(560e-6, rel=0.005)
    assert line == pytest.approx(3 * (v / 4) / 4.5e10, rel=1e-12)
    ring_topo = replace(parse_topology("v5e:4x4"), wraparound=(True, True))
    ring = collective_time(lower("all-gather", v, ring_topo, ("x",)), link_params(ring_topo, "datasheet"))
    assert ring == pytest.approx(3 / 4 * 373e-6, rel=0.005)  # the book's V/W, rounded to 3 figures
    assert ring == pytest.approx(3 / 4 * v / 9e10, rel=1e-12)
    assert line / ring == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("spec, axes", [("v5p:4x4x4", "xyz"), ("v5p:4x4x4", "xy"), ("v5e:16x16", "xy")])
def test_multi_axis_all_gather(spec, axes):
    """Book: over several axes T = V / (W * n_axes); exactly (1 - 1/N) V / (n W) for equal axes."""
    topo = parse_topology(spec)
    n = len(axes)
    N = math.prod(topo.axis_size(a) for a in axes)
    v = 4e9
    t = t_ds("all-gather", v, spec, axes)
    assert t == pytest.approx((1 - 1 / N) * v / (n * topo.chip.ici_axis_bytes_per_s), rel=1e-12)
    assert t == pytest.approx(v / (topo.chip.ici_axis_bytes_per_s * n), rel=1 / N + 1e-12)


def test_multi_axis_balances_a_line_against_a_ring():
    """8x16: x is a line, y a ring. Using both beats either alone."""
    v = 1e9
    both = t_ds("all-gather", v, "v5e:8x16", "xy")
    assert both < t_ds("all-gather", v / 8, "v5e:8x16", "x") + t_ds("all-gather", v, "v5e:8x16", "y")
    assert both < t_ds("all-gather", v, "v5e:8x16", "y")


@pytest.mark.parametrize("spec, axes", [("v5p:4x4x4", "x"), ("v5p:4x4x8", "xyz"), ("v5e:16x16", "xy")])
def test_all_to_all(spec, axes):
    """Book (corrected Aug 2025): AllToAll on an A x B x C mesh takes V_book max(A,B,C) / (4 N W), with
    V_book the global array; our V is one device's buffer, V_book = N V."""
    topo = parse_topology(spec)
    sizes = [topo.axis_size(a) for a in axes]
    N = math.prod(sizes)
    v_local = 1e8
    t = t_ds("all-to-all", v_local, spec, axes)
    assert t == pytest.approx(N * v_local * max(sizes) / (4 * N * topo.chip.ici_axis_bytes_per_s), rel=1e-12)


def test_q10_all_to_all_vs_all_gather_on_one_link(book_cases):
    """Book sharding Q10: on a bidirectional ring, AllToAll puts 1/4 of AllGather's bytes on a link
    (large-D limit; exactly D / (4 (D - 1)))."""
    case = book_cases["sharding-q10-alltoall-vs-allgather"]
    expected = value(case, "expected", "ratio_bidi")
    topo = parse_topology("v5e:16x16")
    d = 16
    full = 1e9  # the N x N matrix
    ag = lower("all-gather", full, topo, ("x",)).link_bytes_by_axis()["x"]
    a2a = lower("all-to-all", full / d, topo, ("x",)).link_bytes_by_axis()["x"]
    assert a2a / ag == pytest.approx(d / (4 * (d - 1)), rel=1e-12)
    assert a2a / ag == pytest.approx(expected, rel=1 / (d - 1) + 1e-12)
    # Bidirectional gains: AG link bytes (X-1)/X * V / 2 per direction, i.e. half of one direction's N^2(1-1/D).
    assert ag == pytest.approx(full * (1 - 1 / d) / value(case, "expected", "bidi_gain_allgather"), rel=1e-12)


# ---- the latency-bound regime ---------------------------------------------------------------------

def _threshold_bytes(kind, spec, axis, lo=1.0, hi=1e9):
    """Smallest V at which the collective stops being latency-bound (time > steps x 1 us)."""
    topo = parse_topology(spec)
    lp = link_params(topo, "datasheet")
    steps = sum(max(p.steps for p in s.phases) for s in lower(kind, hi, topo, (axis,)).stages)
    floor = steps * topo.chip.ici_hop_latency_s
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if collective_time(lower(kind, mid, topo, (axis,)), lp) > floor * (1 + 1e-12):
            hi = mid
        else:
            lo = mid
    return hi


def test_latency_bound_threshold_is_45kB_per_hop(book_cases):
    """Book: a v5e hop is latency-bound when its bytes < W_one_way x 1 us = 45 kB."""
    case = book_cases["sharding-latency-bound-threshold-v5e"]
    expected = value(case, "expected", "bytes")
    topo = parse_topology("v5e:16x16")
    v = _threshold_bytes("all-gather", "v5e:16x16", "x")
    plan = lower("all-gather", v, topo, ("x",))
    (phase,) = plan.stages[0].phases
    assert phase.link_bytes / phase.steps == pytest.approx(expected, rel=1e-6)
    # Below it, the time is flat at X/2 hops (book: T_min * X / 2); above it, it grows.
    lp = link_params(topo, "datasheet")
    assert collective_time(lower("all-gather", v / 10, topo, ("x",)), lp) == pytest.approx(8e-6, rel=1e-12)
    assert collective_time(lower("all-gather", v * 10, topo, ("x",)), lp) > 8e-6 * 9


def test_megatron_activation_collectives_latency_bound(book_cases):
    """Book inference.md Appendix C: an 8-way collective is latency-bound while bytes / 8 / W < 1 us,
    i.e. below 360 kB; the BS=16, D=8192 int8 example (131 kB) is latency-bound. On v5e's 8-long
    (unwrapped) axis each hop carries exactly bytes / 8."""
    case = book_cases["inf-appC-latency-bound-collectives"]
    threshold = value(case, "expected", "threshold_bytes")
    assert _threshold_bytes("all-gather", "v5e:8x16", "x") == pytest.approx(threshold, rel=1e-6)
    b, d = value(case, "inputs", "B"), value(case, "inputs", "D")
    assert t_ds("all-gather", b * d, "v5e:8x16", "x") == pytest.approx(7 * 1e-6, rel=1e-12)  # 7 hops x 1 us


# ---- across slices ------------------------------------------------------------------------------

def test_dcn_all_reduce_is_hierarchical():
    """AR over xyz + dcn: RS over ICI, AR of the 1/M shard over DCN (2 (S-1)/S V / (M W_dcn)), AG over ICI."""
    spec, s = "v5p:4x4x4", 4
    v = 8e9
    m = 64
    hier = t_ds("all-reduce", v, spec, "xyz,dcn", slices=s)
    ici = t_ds("all-reduce", v, spec, "xyz", slices=s)
    dcn = 2 * (s - 1) / s * (v / m) / 6.25e9
    assert hier == pytest.approx(ici + dcn, rel=1e-12)
    # DCN alone: every chip exchanges its whole V with its peers in the other slices.
    assert t_ds("all-gather", v, spec, "dcn", slices=s) == pytest.approx((s - 1) / s * v / 6.25e9, rel=1e-12)


# ---- calibrated mode against measured curves -----------------------------------------------------

@pytest.mark.parametrize("curve_id, spec, kind, axis", [
    ("fig-v5e-8x16-allgather-curve", "v5e:8x16", "all-gather", "y"),
    ("fig-v5p-4x4x4-allreduce-curve", "v5p:4x4x4", "all-reduce", "x"),
])
def test_calibrated_goodness_of_fit(book_cases, curve_id, spec, kind, axis):
    """Goodness of fit, not a prediction: the constants were fitted on these very points. Within 10% for
    every message of 1 MiB and more (the issue's budget); residuals printed. The out-of-sample check is
    test_calibration_out_of_sample."""
    case = book_cases[curve_id]
    sizes = [float(x) for x in case["inputs"]["sizes_bytes"]["value"]]
    runtimes = case["expected"]["runtime"]["value"]
    topo = parse_topology(spec)
    lp = link_params(topo, "calibrated")
    errors = []
    for size, measured in zip(sizes, runtimes):
        if measured is None or size < 2**20:
            continue
        predicted = collective_time(lower(kind, size, topo, (axis,)), lp)
        errors.append(predicted / float(measured) - 1)
        print(f"{curve_id} {size:>14.0f} B  measured {float(measured):.3e} s  predicted {predicted:.3e} s  "
              f"error {errors[-1]:+.1%}")
    assert len(errors) >= 7
    assert max(abs(e) for e in errors) < 0.10
    # ...and datasheet mode is measurably optimistic, so the calibration is doing something.
    ds = collective_time(lower(kind, sizes[-1], topo, (axis,)), link_params(topo, "datasheet"))
    assert ds < 0.95 * float(runtimes[-1])


def test_calibration_file_is_what_the_fit_gives():
    """topologies/calibration.yaml must be reproducible by `python -m tpusim.fit --write`."""
    pytest.importorskip("scipy")
    from tpusim.sim.calibration import load_calibration
    from tpusim.fit import calibration_document, fit_all

    fitted = calibration_document(fit_all())["chips"]
    committed = load_calibration()
    for chip in ("v5e", "v5p"):
        want = fitted[chip]["collectives"]
        got = committed[chip].collectives
        assert got.ici_link_efficiency == pytest.approx(want["ici_link_efficiency"], abs=2e-4)
        assert got.overhead_s == pytest.approx(want["overhead_s"], rel=1e-3)
        assert got.overlap_exponent == pytest.approx(want["overlap_exponent"], abs=2e-3)
    for chip in ("v2", "v5e", "v5p"):
        want = fitted[chip]["collectives"]
        got = committed[chip].collectives
        assert got.in_step_overhead_s == pytest.approx(want["in_step_overhead_s"], rel=1e-3)
        assert got.dcn_efficiency == pytest.approx(want["dcn_efficiency"], abs=2e-4)
    assert committed["v2"].collectives.ici_link_efficiency == pytest.approx(
        fitted["v2"]["collectives"]["ici_link_efficiency"], abs=2e-4)
    # The fitted v5e efficiency is the book's "about 94-95% of the link rate" (sharding.md).
    assert committed["v5e"].collectives.ici_link_efficiency == pytest.approx(0.94, abs=0.01)


@pytest.mark.parametrize("curve, held_out", [
    ("v5e-8x16-allgather", 0), ("v5e-8x16-allgather", 1), ("v5p-4x4x4-allreduce", 0),
    pytest.param("v5p-4x4x4-allreduce", 1, marks=pytest.mark.xfail(strict=True, reason=(
        "v5p's knee: without the 16 MiB point (where the ~130 us floor meets the bandwidth line) the three "
        "constants put the knee elsewhere and the held-out 16 MiB point comes out +13%"))),
])
def test_calibration_out_of_sample(curve, held_out):
    """Fit on alternate points of a measured curve, predict the others: every held-out message of
    1 MiB and more within the issue's 10%."""
    pytest.importorskip("scipy")
    from tpusim.config import read_yaml
    from tpusim.data import data_dir
    from tpusim.fit import fit_curve

    data = read_yaml(data_dir("topologies") / "collective_measurements.yaml")["curves"][curve]
    n = len(data["bytes"])
    keep = [i % 2 != held_out for i in range(n)]
    fit = fit_curve(curve, data, keep=keep)
    errors = [e for i, (b, e) in enumerate(zip(fit.bytes, fit.rel_errors)) if not keep[i] and b >= 2**20]
    print(curve, f"fitted on {sum(keep)} points, held-out errors:", [f"{e:+.1%}" for e in errors])
    assert len(errors) >= 3
    assert max(abs(e) for e in errors) < 0.10


# ---- structure and bad input ---------------------------------------------------------------------

def test_plans_record_link_traffic():
    topo = parse_topology("v5e:16x16")
    plan = lower("all-reduce", 1e9, topo, parse_axes("x", topo))
    assert [p.op for s in plan.stages for p in s.phases] == ["reduce", "gather"]
    assert plan.link_bytes_by_axis()["x"] == pytest.approx(2 * 15 / 16 * 1e9 / 2)
    assert plan.group_size == 16
    trivial = lower("all-gather", 1e9, parse_topology("v5p:4x4x1"), ("z",))
    assert trivial.stages == () and collective_time(trivial, link_params(parse_topology("v5p:4x4x1"))) == 0.0


def test_calibrated_is_monotone_in_bytes():
    topo = parse_topology("v5p:4x4x8")
    lp = link_params(topo, "calibrated")
    times = [collective_time(lower("all-gather", b, topo, ("x", "y")), lp) for b in np.logspace(3, 10, 30)]
    assert all(b >= a for a, b in zip(times, times[1:]))  # flat while latency-bound, then rising
    assert times[-1] > 100 * times[0]


@pytest.mark.parametrize("axes, words", [("w", "no axis 'w'"), ("z", "no axis 'z'"), ("dcn", "several slices"),
                                         ("xx", "named twice"), ("", "no axis given")])
def test_bad_axes(axes, words):
    with pytest.raises(TpusimError, match=words):
        parse_axes(axes, parse_topology("v5e:16x16"))


@pytest.mark.parametrize("nbytes", [0, -5, float("nan"), float("inf")])
def test_bad_bytes(nbytes):
    topo = parse_topology("v5e:16x16")
    with pytest.raises(TpusimError, match="positive"):
        lower("all-gather", nbytes, topo, ("x",))


def test_spans_of_an_axis():
    """A mesh axis on part of a torus axis: a contiguous segment is a line; a strided part of a wrapped
    axis is a ring whose hops cross `stride` links, shared by `stride` interleaved groups."""
    from tpusim.sim.collectives import Span

    topo = parse_topology("v5e:16x16")
    lp = link_params(topo, "datasheet")
    v = 1e8
    whole = collective_time(lower("all-gather", v, topo, ("x",)), lp)
    assert collective_time(lower("all-gather", v, topo, (Span("x", 16),)), lp) == whole
    segment = collective_time(lower("all-gather", v, topo, (Span("x", 4, 1),)), lp)
    assert segment == pytest.approx(3 * (v / 4) / 4.5e10, rel=1e-12)  # a 4-chip line
    strided = lower("all-gather", v, topo, (Span("x", 4, 4),))
    assert strided.stages[0].phases[0].algorithm == "ring"
    assert collective_time(strided, lp) == pytest.approx(4 * (3 / 4) * v / 9e10, rel=1e-12)
    # Latency: each strided hop crosses 4 links.
    tiny = lower("all-gather", 8.0, topo, (Span("x", 4, 4),))
    assert collective_time(tiny, lp) == pytest.approx(2 * 4 * 1e-6, rel=1e-12)


# ---- across slices: the DCN model's pieces --------------------------------------------------------

def test_dcn_calibrated_all_reduce_closed_form():
    """Calibrated, inside a step: RS over the ICI axes at eta, a ring over S slices at dcn_efficiency of
    the per-chip egress (S-1 steps of at least the DCN latency), AG over ICI, plus the in-step fixed cost."""
    from tpusim.sim.calibration import get_calibration

    s, v, spec = 8, 4e9, "v5e:16x16"
    topo = parse_topology(spec, slices=s)
    fit = get_calibration("v5e", "calibrated").collectives
    lp = link_params(topo, "calibrated", in_step=True)
    ici = 2 * (1 - 1 / 256) * v / (2 * 2 * 4.5e10 * fit.ici_link_efficiency)  # RS + AG over x and y
    dcn = 2 * (s - 1) / s * (v / 256) / (3.125e9 * fit.dcn_efficiency)
    got = collective_time(lower("all-reduce", v, topo, parse_axes("xy,dcn", topo)), lp)
    assert got == pytest.approx(ici + dcn + fit.in_step_overhead_s, rel=1e-12)
    # Latency-bound: a tiny all-reduce over DCN alone takes 2 (S-1) DCN latencies (datasheet mode).
    tiny = collective_time(lower("all-reduce", 8.0, topo, ("dcn",)), link_params(topo, "datasheet"))
    assert tiny == pytest.approx(2 * (s - 1) * topo.chip.dcn_latency_s, rel=1e-12)


def test_dcn_efficiency_is_the_psum_microbenchmark():
    """Goodness of fit (the constant is computed from this one point): the v6e psum over DCN of a
    0.606 GB bf16 matrix sharded over 2 slices, 4.113 GB/s by the benchmark's definition (ring bytes per
    device over the time, 73.7 ms), against 12.5 GB/s of datasheet egress per chip (book tpus.md)."""
    from tpusim.sim.calibration import get_calibration

    topo = parse_topology("v6e:16x16", slices=2)
    v = 606076928 / 2
    t = collective_time(lower("all-reduce", v, topo, ("dcn",)), link_params(topo, "calibrated"))
    overhead = get_calibration("v6e", "calibrated").collectives.overhead_s
    assert t == pytest.approx(v / 4.1130934137328214e9, rel=0.01, abs=overhead)
    assert get_calibration("v6e", "calibrated").collectives.dcn_efficiency == pytest.approx(4.113 / 12.5, abs=1e-3)


def test_dcn_parameters_cite_their_sources():
    """Every DCN number of the chip catalog has a source (or says ASSUMED), and every calibrated chip's DCN
    efficiency names the microbenchmark it comes from."""
    import yaml

    from tpusim.sim.calibration import get_calibration
    from tpusim.data import data_dir

    chips = yaml.safe_load((data_dir("topologies") / "chips.yaml").read_text())
    for name, chip in chips.items():
        for key in ("dcn_bandwidth_per_chip", "dcn_latency"):
            if key in chip:
                assert chip[key].get("src"), f"{name}.{key} has no source"
        fit = get_calibration(name, "calibrated").collectives
        assert "recipes-trillium-psum-ici-dcn-sample" in fit.dcn_fitted_on
        assert "pod_viewer" in fit.in_step_fitted_on


def test_in_step_overhead_is_below_the_host_timed_ones():
    """Inside a step a collective pays microseconds (the v2 step's collectives), far below the host-timed
    curves' fixed costs (13 us on v5e, a ~130 us floor on v5p) that include a host dispatch."""
    from tpusim.sim.calibration import get_calibration

    for chip in ("v2", "v5e", "v5p", "v4", "v6e", "tpu7x"):
        fit = get_calibration(chip, "calibrated").collectives
        assert 1e-6 < fit.in_step_overhead_s < 10e-6
    assert get_calibration("v5p", "calibrated").collectives.overhead_s > 100e-6
    topo = parse_topology("v5p:4x4x4")
    small = lower("all-gather", 1e5, topo, ("x",))
    assert (collective_time(small, link_params(topo, "calibrated", in_step=True))
            < collective_time(small, link_params(topo, "calibrated")) / 10)
