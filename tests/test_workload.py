"""Workload files: both vocabularies, every mistake named by file and key, and the mesh placement."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpusim.errors import TpusimError
from tpusim.model.mesh import resolve_mesh
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import load_workload, workload_from_dict

from conftest import REPO


def load(d):
    return workload_from_dict(d, source="w.yaml")


BASE = {"model": {"model_name": "llama3-8b"}, "step": {"per_device_batch_size": 1}}


def test_sectioned_and_flat_forms_agree():
    flat = load({"model_name": "llama3-8b", "per_device_batch_size": 1, "max_target_length": 4096,
                 "ici_tensor_parallelism": 4})
    sectioned = load({"model": {"model_name": "llama3-8b"},
                      "step": {"per_device_batch_size": 1, "max_target_length": 4096},
                      "sharding": {"ici_tensor_parallelism": 4}})
    assert flat.model == sectioned.model and flat.step == sectioned.step
    assert flat.parallelism == sectioned.parallelism


def test_maxtext_defaults_and_ignored_keys():
    w = load({"model_name": "llama3-8b", "per_device_batch_size": 2, "run_name": "x", "learning_rate": 3e-4,
              "base_output_directory": "gs://b", "steps": 20})
    assert w.parallelism.ici["fsdp"] == -1 and w.parallelism.dcn["data"] == -1  # MaxText's defaults
    assert w.step.weight_dtype == "float32" and w.step.dtype == "bfloat16" and w.step.remat_policy == "full"
    assert set(w.ignored_keys) == {"run_name", "learning_rate", "base_output_directory", "steps"}


@pytest.mark.parametrize("d, key, words", [
    ({**BASE, "model": {"model_name": "llama3-8b", "base_emb_dimm": 5}}, "model.base_emb_dimm", "did you mean 'base_emb_dim'"),
    ({**BASE, "frobnicate": 1}, "frobnicate", "unknown key"),
    ({**BASE, "step": {"per_device_batch_size": 1, "vocab_size": 5}}, "step.vocab_size", "belongs in section 'model'"),
    ({**BASE, "model": {"model_name": "llama9"}}, "model.model_name", "unknown model"),
    ({**BASE, "step": {"per_device_batch_size": 0}}, "step.per_device_batch_size", "positive"),
    ({**BASE, "step": {"per_device_batch_size": "lots"}}, "step.per_device_batch_size", "not a number"),
    ({**BASE, "step": {"per_device_batch_size": 1, "remat_policy": "some"}}, "step.remat_policy", "not one of"),
    ({**BASE, "sharding": {"ici_fsdp_parallelism": -1, "ici_data_parallelism": -1}}, "ici_*_parallelism", "only one"),
    ({**BASE, "sharding": {"ici_tensor_parallelism": 0}}, "sharding.ici_tensor_parallelism", "positive"),
    ({**BASE, "quantization": "intmp"}, "quantization", "not modelled yet"),
    ({**BASE, "sharding": {"physical_axes": {"tensr": "x"}}}, "physical_axes.tensr", "unknown mesh axis"),
    ({"model": {"base_emb_dim": 64, "base_num_query_heads": 8, "base_num_kv_heads": 3, "base_mlp_dim": 128,
                "base_num_decoder_layers": 2}, "step": {"per_device_batch_size": 1}}, "model.base_num_kv_heads", "GQA"),
    ({"model": {"base_emb_dim": 64}, "step": {"per_device_batch_size": 1}}, "base_num_query_heads", "required"),
])
def test_mistakes_name_file_and_key(d, key, words):
    with pytest.raises(TpusimError) as e:
        load(d)
    assert e.value.source == "w.yaml"
    assert e.value.key == key
    assert words in e.value.reason


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(TpusimError, match="not valid YAML at line"):
        load_workload(p)
    with pytest.raises(TpusimError, match="file not found"):
        load_workload(tmp_path / "missing.yaml")


def test_every_shipped_workload_loads():
    paths = [p for p in (REPO / "workloads").rglob("*.yaml")
             if p.name not in ("models.yaml", "measured.yaml") and p.parent.name != "sweeps"]
    assert len(paths) >= 9
    for p in paths:
        if p.name.startswith("serve_"):  # inference workloads (tpusim serve)
            from tpusim.serving import load_serve_workload

            w = load_serve_workload(p).workload
        else:
            w = load_workload(p)
        assert w.topology and w.chip, p


# ---- mesh ---------------------------------------------------------------------------------------

def mesh_of(ici, spec, slices=1, dcn=None, physical=None):
    w = load({**BASE, "sharding": {**{f"ici_{k}_parallelism": v for k, v in ici.items()},
                                   **{f"dcn_{k}_parallelism": v for k, v in (dcn or {}).items()},
                                   **({"physical_axes": physical} if physical else {})}})
    return resolve_mesh(w.parallelism, parse_topology(spec, slices=slices), source="w.yaml")


def test_mesh_fills_the_rest_and_places_tensor_on_a_whole_axis():
    m = mesh_of({"tensor": 4}, "v5p:4x4x8")
    assert m.ici["fsdp"] == 32 and m.ici["tensor"] == 4
    assert len(m.physical["tensor"]) == 1 and m.physical["tensor"][0] in ("x", "y")
    assert sorted(m.axes_of("fsdp"), key=str) == sorted({"x", "y", "z"} - set(m.physical["tensor"]))
    assert m.dcn == {"data": 1, "fsdp": 1, "pipeline": 1}


def test_mesh_puts_tensor_on_the_axis_of_its_size():
    m = mesh_of({"tensor": 16}, "v5e:8x16")
    assert m.physical["tensor"] == ("y",)


def _mesh_utils_cases():
    import json
    return json.loads((Path(__file__).parent / "data" / "mesh_utils_assignments.json").read_text())["cases"]


@pytest.mark.parametrize("case", _mesh_utils_cases(), ids=lambda c: f"{c['torus']}-" + "-".join(
    f"{a}{n}" for a, n in c["mesh"].items()))
def test_mesh_placement_is_mesh_utils(case):
    """MaxText builds its mesh with jax's mesh_utils.create_device_mesh: tpusim places each mesh axis on
    the torus axes it does (tests/data/mesh_utils_assignments.json, made by running jax 0.10.2's
    _create_device_mesh_for_nd_torus: traces/mesh_utils_cases.py), and where no whole axes fit the part of
    an axis it gives with allow_split_physical_axes (a contiguous segment or a strided set)."""
    x, y, z = map(int, case["torus"].split("x"))
    spec = f"v5e:{x}x{y}" if z == 1 else f"v5p:{x}x{y}x{z}"
    w = load({**BASE, "model": {**BASE["model"], "num_experts": 16, "num_experts_per_tok": 2},
              "sharding": {f"ici_{a}_parallelism": n for a, n in
                           {"fsdp": 1, "data": 1, **case["mesh"]}.items()}})
    m = resolve_mesh(w.parallelism, parse_topology(spec), source="w.yaml")

    def part(p) -> str:
        return p if isinstance(p, str) else f"{p.axis}:{p.size}/{p.stride}"

    got = {a: sorted(part(p) for p in m.physical[a]) for a in case["mesh"]}
    assert got == {a: sorted(parts) for a, parts in case["axes"].items()}


def test_mesh_splits_an_axis_when_it_must():
    from tpusim.sim.collectives import Span
    m = mesh_of({"tensor": 4}, "v5e:16x16")
    assert m.physical["tensor"] == (Span("x", 4, 1),)  # the contiguous inner segment
    assert set(m.axes_of("fsdp")) == {"y", Span("x", 4, 4)}


def test_mesh_splits_axes_as_mesh_utils_does():
    """fsdp 4 x context 8 x tensor 8 on a 16x16 takes no whole axes: jax's mesh_utils with
    allow_split_physical_axes gives the assignment x: [1, 2, 8], y: [4, 4, 1] (fsdp, context, tensor;
    the later mesh axis inner), so tensor is a contiguous 8 of x and context spans both axes."""
    from tpusim.sim.collectives import Span
    m = mesh_of({"fsdp": 4, "tensor": 8, "sequence": 8}, "v5e:16x16")
    assert m.physical["tensor"] == (Span("x", 8, 1),)
    assert m.physical["sequence"] == (Span("x", 2, 8), Span("y", 4, 1))
    assert m.physical["fsdp"] == (Span("y", 4, 4),)


def test_mesh_explicit_physical_axes():
    m = mesh_of({"tensor": 8}, "v5p:4x4x8", physical={"tensor": "z"})
    assert m.physical["tensor"] == ("z",)
    with pytest.raises(TpusimError, match="hold 4 chips"):
        mesh_of({"tensor": 8}, "v5p:4x4x8", physical={"tensor": "x"})


@pytest.mark.parametrize("ici, spec, slices, dcn, words", [
    ({"fsdp": 8, "tensor": 4}, "v5p:4x4x4", 1, None, "has 32 devices but a v5p:4x4x4 slice has 64"),
    ({"fsdp": -1, "tensor": 3}, "v5p:4x4x4", 1, None, "does not divide"),
    ({"fsdp": -1}, "v5p:4x4x4", 2, {"data": 3}, "has 3 devices but 2 slices"),
])
def test_impossible_meshes(ici, spec, slices, dcn, words):
    with pytest.raises(TpusimError, match=words):
        mesh_of(ici, spec, slices, dcn)


@pytest.mark.parametrize("overrides, key, words", [
    ({"dcn_pipeline_parallelism": 2, "num_pipeline_microbatches": 4}, "dcn_pipeline_parallelism", "--slices"),
    ({"ici_tensor_parallelism": 3}, "ici_tensor_parallelism", "128 chips"),
])
def test_a_mesh_axis_that_does_not_divide_is_named(overrides, key, words):
    """The axis the user set is named (not the -1 axis that would absorb the rest), in slices for DCN."""
    from tpusim.api import compile_workload
    from tpusim.errors import TpusimError

    with pytest.raises(TpusimError) as e:
        compile_workload(REPO / "workloads" / "llama3_8b_fsdp_tp.yaml", overrides=overrides)
    assert e.value.key == key and words in e.value.reason and "does not divide" in e.value.reason
