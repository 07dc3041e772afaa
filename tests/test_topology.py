"""Topology invariants: chip, host and link counts, degrees, wraparound rules, and the graph's shape."""

from __future__ import annotations

import math

import networkx as nx
import pytest

from tpusim.sim.chips import chip_names, get_chip
from tpusim.errors import TpusimError
from tpusim.sim.topology import build_graph, parse_topology

from conftest import value


@pytest.mark.parametrize("spec, wrap", [
    ("v5e:16x16", (True, True)),
    ("v5e:8x16", (False, True)),       # book: an 8x16 wraps on its long axis only
    ("v5e:4x4", (False, False)),
    ("v6e:16x16", (True, True)),
    ("v5p:4x4x4", (True, True, True)),  # a full cube
    ("v5p:4x4x8", (True, True, True)),
    ("v5p:2x2x4", (False, False, False)),  # book: sub-cube slices have no wraparound
    ("v5p:2x2x1", (False, False, False)),
    ("v4:4x4x4", (True, True, True)),
    ("tpu7x:4x4x4", (True, True, True)),
    ("tpu7x:2x2x2", (False, False, False)),
    ("v5p:16x20x28", (True, True, True)),
])
def test_wraparound_rules(spec, wrap):
    assert parse_topology(spec).wraparound == wrap


def test_default_chip_by_rank_and_caller():
    assert parse_topology("16x16").chip.name == "v5e"
    assert parse_topology("4x4x4").chip.name == "v5p"
    assert parse_topology("16x16", default_chip="v6e").chip.name == "v6e"
    assert parse_topology("v5p:4x4x4", default_chip="v4").chip.name == "v5p"  # explicit chip wins


def _ici_edges(g):
    return [(u, v, d) for u, v, d in g.edges(data=True) if d["kind"] == "ici"]


@pytest.mark.parametrize("spec", ["v5e:16x16", "v5e:8x16", "v5e:2x4", "v5p:4x4x4", "v5p:2x2x4",
                                  "v4:4x4x8", "v2:2x2", "v6e:4x8", "tpu7x:4x4x4"])
def test_graph_counts_and_degrees(spec):
    topo = parse_topology(spec)
    g = build_graph(topo)
    ici = _ici_edges(g)
    chips = [n for n, d in g.nodes(data=True) if d["kind"] == "chip"]
    assert len(chips) == math.prod(topo.shape) == topo.num_chips
    # Each physical link is one edge per direction.
    assert len(ici) == 2 * topo.ici_links
    # Closed form per axis: N/X rings of X links (wrapped) or lines of X - 1 links.
    expected = 0
    for x, w in zip(topo.shape, topo.wraparound):
        if x > 1:
            expected += topo.num_chips // x * (x if w else x - 1)
    assert topo.ici_links == expected
    # Degree: 2 per wrapped axis; on a line, 1 at the two ends and 2 inside.
    for n in chips:
        coords = g.nodes[n]["coords"]
        want = sum(0 if x == 1 else 2 if (w or 0 < c < x - 1) else 1
                   for c, x, w in zip(coords, topo.shape, topo.wraparound))
        assert sum(1 for _, _, d in g.out_edges(n, data=True) if d["kind"] == "ici") == want
    # Every link runs between neighbours one step apart along its axis (mod X where it wraps).
    for u, v, d in ici:
        cu, cv = g.nodes[u]["coords"], g.nodes[v]["coords"]
        ai = topo.axis_index(d["axis"])
        assert [i for i in range(len(cu)) if cu[i] != cv[i]] == [ai]
        assert (cu[ai] + d["direction"]) % topo.shape[ai] == cv[ai]
    # Hosts: each drives chips_per_host chips, all in one host block.
    hosts = [n for n, d in g.nodes(data=True) if d["kind"] == "host"]
    assert len(hosts) == topo.num_hosts == topo.num_chips // topo.chips_per_host


def test_size_two_wrapped_axis_keeps_both_links():
    """networkx's grid_graph(periodic=True) merges the two links of a wrapped axis of length 2; a
    topology told to wrap a 2-long axis keeps both (the + and the - link to the same neighbour)."""
    from tpusim.sim.topology import replace

    topo = replace(parse_topology("v5e:2x2"), wraparound=(True, True))
    g = build_graph(topo)
    out = [(v, d["axis"], d["direction"]) for _, v, d in g.out_edges(0, data=True) if d["kind"] == "ici"]
    assert len(out) == 4  # +x and -x both reach chip (1, 0); +y and -y both reach (0, 1)
    assert len({v for v, _, _ in out}) == 2
    # Closed form over the whole graph: per axis N/X rings of X = 2 links, so 2 x 2 x 2 = 8 links, 16
    # directed edges; networkx's merged grid would give half.
    assert topo.ici_links == 8 and len(_ici_edges(g)) == 2 * topo.ici_links
    assert topo.name == "v5e:2x2 (wraparound x:on y:on)"  # an override shows in every report
    assert parse_topology("v2:2x2").wraparound == (False, False)  # a real 2-long axis: one link pair
    assert parse_topology("v2:4x4").wraparound == (True, True)


def test_graph_is_the_known_torus():
    """v5e:8x16 is an 8-line by 16-ring grid; grid_graph lists dims in reverse (its other trap)."""
    topo = parse_topology("v5e:8x16")
    ours = nx.Graph((u, v) for u, v, _ in _ici_edges(build_graph(topo)))
    known = nx.grid_graph(dim=[16, 8], periodic=[True, False])
    assert nx.is_isomorphic(ours, known)
    assert not nx.is_isomorphic(ours, nx.grid_graph(dim=[16, 8], periodic=False))


def test_full_pods_match_the_book(book_cases):
    v5e = parse_topology("v5e:16x16")
    case = book_cases["tpus-q2-v5e-pod"]
    assert v5e.num_chips == value(case, "inputs", "chips")
    assert v5e.num_hosts == value(case, "expected", "hosts")
    v5p = parse_topology("v5p:16x20x28")
    case = book_cases["tpus-q2-v5p-pod"]
    assert v5p.num_chips == value(case, "inputs", "chips")
    assert v5p.num_hosts == value(case, "expected", "hosts")
    assert v5p.num_chips * v5p.chip.cores_per_chip == value(case, "expected", "cores")
    flops = v5p.num_chips * v5p.chip.bf16_flops_per_s
    assert flops == pytest.approx(value(book_cases["tpus-v5p-pod-flops"], "expected", "pod_flops"), rel=0.01)


def test_hosts_orient_to_the_slice():
    assert parse_topology("v5e:2x4").num_hosts == 1   # one 8-chip host, turned to 2x4
    assert parse_topology("v5e:2x2").num_hosts == 1
    assert parse_topology("v5e:8x16").num_hosts == 16
    topo = parse_topology("v5p:4x4x4")
    g = build_graph(topo)
    for h in range(topo.num_hosts):
        members = [n for n in g.predecessors(("host", h)) if isinstance(n, int)]
        coords = [g.nodes[n]["coords"] for n in members]
        assert len(members) == 4
        assert all(max(c[i] for c in coords) - min(c[i] for c in coords) < b
                   for i, b in enumerate(topo.host_block))


def test_bisection_closed_form():
    # 16x16 torus: cutting either axis crosses 16 rings x 2 links.
    assert parse_topology("v5e:16x16").bisection_bytes_per_s == 32 * 4.5e10
    # 8x16: the 8-long lines cut at 16 links; the 16-long rings at 8 x 2 = 16.
    assert parse_topology("v5e:8x16").bisection_bytes_per_s == 16 * 4.5e10
    # 4x4x8 cube pair: worst cut across z: 16 rings x 2 links.
    assert parse_topology("v5p:4x4x8").bisection_bytes_per_s == 32 * 9e10
    assert parse_topology("v5p:2x2x1").bisection_bytes_per_s == 2 * 9e10


def test_multislice():
    one = parse_topology("v5p:4x4x4")
    four = parse_topology("v5p:4x4x4", slices=4)
    assert four.num_chips == 4 * one.num_chips
    assert four.num_hosts == 4 * one.num_hosts
    assert four.ici_links == 4 * one.ici_links
    g = build_graph(four)
    nics = [(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "dcn"]
    assert len(nics) == 2 * four.num_hosts  # each host's NIC, both ways, into the fabric
    nic_rate = {d["bytes_per_s"] for _, _, d in g.edges(data=True) if d["kind"] == "dcn"}
    assert nic_rate == {4 * 6.25e9}  # 4 chips x 6.25e9 B/s egress each (book tpus.md)
    # No ICI link crosses slices.
    assert all(g.nodes[u]["slice"] == g.nodes[v]["slice"] for u, v, _ in _ici_edges(g))
    assert four.dcn_bytes_per_s_per_slice == 64 * 6.25e9
    over = parse_topology("v5p:4x4x4", slices=4, dcn_oversubscription=2.0)
    assert over.dcn_bytes_per_s_per_chip == 6.25e9 / 2


def test_every_chip_in_catalog_has_sources():
    """Every datasheet number keeps its source through the loader (a report cites it)."""
    for name in chip_names():
        chip = get_chip(name)
        assert {"bf16_flops_per_s", "hbm_capacity", "hbm_bandwidth", "ici_link_bandwidth", "ici_links_per_chip",
                "ici_hop_latency", "pcie_bandwidth", "cores_per_chip", "mxu_dim", "mxus_per_core",
                "host_shape", "max_slice_shape"} <= set(chip.sources), name
        assert all(src.strip() for src in chip.sources.values()), name
        # A torus has a + and a - link on each axis: two independent catalog entries agree.
        assert chip.ici_links_per_chip == 2 * chip.torus_rank, name


# The catalog's chips under the book's names in tests/data/tpu-specs.yaml (its v4 is the "v4p" row).
BOOK_NAME = {"v3": "v3", "v4": "v4p", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e", "tpu7x": "tpu7x"}
UNIT = {"B/s": 1.0, "FLOP/s": 1.0, "OP/s": 1.0, "s": 1.0, "GB": 1e9, "MB": 1e6, "MiB": 2.0**20, None: 1.0}
# ChipSpec field -> the book's keys for it (the first one present counts).
FIELDS = {
    "bf16_flops_per_s": ("bf16_flops",), "int8_flops_per_s": ("int8_ops",), "hbm_bytes": ("hbm_capacity",),
    "hbm_bytes_per_s": ("hbm_bw",), "vmem_bytes": ("vmem_capacity",),
    "ici_link_bytes_per_s": ("ici_link_bw_one_way",), "ici_axis_bytes_per_s": ("ici_link_bw_bidi",),
    "ici_links_per_chip": ("ici_links_per_chip",), "ici_hop_latency_s": ("ici_hop_latency",),
    "dcn_bytes_per_s": ("dcn_bw_per_chip_egress",), "pcie_bytes_per_s": ("pcie_bw_per_chip", "pcie_bw_each_way"),
    "cores_per_chip": ("cores_per_chip",), "mxus_per_core": ("mxus_per_core", "mxus"),
    "mxu_dim": ("mxu_shape",), "host_shape": ("host_shape",), "max_slice_shape": ("pod_shape", "max_topology"),
}
# Where the catalog deliberately takes another of the book's statements than the spec table's,
# with the chips.yaml note that says why; the spec file's own note must say the same.
DEPARTURES = {
    ("v5e", "hbm_bytes"): (16 * 2.0**30, "16 GiB"),  # tpus.md's prose; the table says 16 GB
    ("v3", "host_shape"): ((2, 2), "4x2"),  # the book's 4x2 counts cores; the catalog counts chips
}


def _book_value(entry: dict, field: str):
    raw = entry["value"]
    if field in ("mxu_dim",):
        return int(str(raw).split("x")[0])
    if field in ("host_shape", "max_slice_shape"):
        return tuple(int(d) for d in str(raw).split("x"))
    return float(raw) * UNIT[entry.get("unit")]


def test_catalog_matches_book_spec_table(tpu_specs):
    """Every number the book's spec table (tests/data/tpu-specs.yaml) gives for a chip in the catalog
    is the catalog's, exactly; the two departures say why."""
    rules = tpu_specs["tpu_rules"]
    checked = 0
    for chip_name, book_name in BOOK_NAME.items():
        chip, book = get_chip(chip_name), tpu_specs["tpu"][book_name]
        for field, keys in FIELDS.items():
            key = next((k for k in keys if k in book), None)
            if field == "ici_hop_latency_s" and key is None:
                book = {**book, "ici_per_hop_latency": rules["ici_per_hop_latency"]}
                key = "ici_per_hop_latency"
            if key is None:
                continue
            ours = getattr(chip, field)
            if (chip_name, field) in DEPARTURES:
                want, said = DEPARTURES[(chip_name, field)]
                assert said in book[key].get("note", "") + str(book[key]["value"]), (chip_name, field)
                assert ours == want, (chip_name, field)
            elif isinstance(ours, tuple):
                assert ours == _book_value(book[key], field), (chip_name, field)
            else:
                assert ours == pytest.approx(_book_value(book[key], field), rel=1e-12), (chip_name, field, key)
            checked += 1
        # megacore: the book's cores_per_chip note says which chips join their two cores
        note = book.get("cores_per_chip", {}).get("note", "")
        if note:
            assert chip.megacore == ("megacore" in note and "no megacore" not in note), chip_name
            assert chip.devices_per_chip == (1 if chip.megacore else chip.cores_per_chip), chip_name
    assert checked >= 70  # every chip's table row, not a spot check
    # The book's critical intensities (FLOPs per byte) follow from the catalog's numbers.
    ci = tpu_specs["critical_intensities"]
    v5e, v5p = get_chip("v5e"), get_chip("v5p")
    assert v5e.bf16_flops_per_s / v5e.hbm_bytes_per_s == pytest.approx(ci["v5e_hbm_bf16"]["value"], rel=0.005)
    assert v5e.bf16_flops_per_s / v5e.ici_link_bytes_per_s == pytest.approx(ci["v5e_ici_one_way"]["value"], rel=0.005)
    assert v5p.bf16_flops_per_s / v5p.ici_axis_bytes_per_s == pytest.approx(ci["v5p_ici_bidi"]["value"], rel=0.005)


@pytest.mark.parametrize("spec, words", [
    ("v9:4x4", "unknown chip"),
    ("v5e:32x32", "larger than the largest"),
    ("v5e:16x16x4", "2D"),
    ("v5p:4x4", "3D"),
    ("v5e:6x6", "power-of-two"),
    ("v5p:3x3x3", "cube"),
    ("v5p:2x2x8", "cube"),
    ("tpu7x:4x4x1024", "larger than the largest"),
    ("v5e:16by16", "CHIP:SHAPE"),
    ("v5e:0x4", "at least 1"),
])
def test_bad_topologies(spec, words):
    with pytest.raises(TpusimError, match=words):
        parse_topology(spec)


def test_bad_slices():
    with pytest.raises(TpusimError, match="whole number"):
        parse_topology("v5e:4x4", slices=0)
    with pytest.raises(TpusimError, match="no DCN bandwidth"):
        parse_topology("v3:4x4", slices=2)
