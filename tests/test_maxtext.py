"""MaxText's own configs: base.yml merged with each model file loads, and simulates or is refused for
a physical reason (issue 15). Data: workloads/maxtext/ (copied from MaxText, see its README)."""

from __future__ import annotations

import math

import pytest
import yaml

from tpusim.model import maxtext as mx
from tpusim.compiler import compile_program, model_flops_breakdown
from tpusim.data import data_dir
from tpusim.sim.engine import simulate
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.analysis.summary import summarize
from tpusim.sim.topology import parse_topology
from tpusim.model.build import _ALIASES, _SECTIONS
from tpusim.model.workload import workload_from_dict

MODELLED = {k for keys in _SECTIONS.values() for k in keys} | set(_ALIASES) | {"num_slices"}
CLASSES = {"modelled": MODELLED, "ignored": set(mx.IGNORED_KEYS), "noted": set(mx.NOTED_KEYS),
           "refused": set(mx.REFUSED_KEYS)}
SOURCE = str(data_dir("workloads") / "maxtext_case.yaml")  # base_config resolves to workloads/maxtext/


def test_every_base_key_is_in_exactly_one_class():
    base = mx.base_config()
    assert len(base) == 696  # MaxText e591f30's base.yml, as its README says
    for key in base:
        homes = [name for name, keys in CLASSES.items() if key in keys]
        assert len(homes) == 1, (key, homes)


def _text_models() -> list[str]:
    """Model files for text training: those that do not switch on a vision or audio encoder."""
    out = []
    for name in mx.model_names():
        f = mx.model_file(name)
        if not (f.get("use_multimodal") or f.get("use_audio")):
            out.append(name)
    return out


# Models whose layers tpusim does not build yet: each refused with "not modelled yet" naming the
# feature. A strict xfail: it fails (and must be removed from here) once the feature is modelled.
NOT_YET = {
    "deepseek-custom": "engram_layers (Engram memory)", "deepseek3.2-671b": "use_indexer (DeepSeek sparse attention)",
    "deepseek3-671b-batchsplit": "use_batch_split_schedule",
    **dict.fromkeys(["deepseek4-284b", "deepseek4-tiny"], "first_num_hash_layers, compressed attention"),
    **dict.fromkeys(["envy-switch-base", "envy-switch-large", "envy-switch-xxl"], "decoder_block envy"),
    "envy-test": "sparse_matmul false (dense MoE matmuls)",
    **dict.fromkeys(["gemma4-26b", "gemma4-31b", "gemma4-e2b", "gemma4-e4b"], "Gemma 4's global_head_dim, per-layer inputs"),
    **dict.fromkeys(["gpt-oss-120b", "gpt-oss-20b"], "decoder_block gpt_oss"),
    **dict.fromkeys(["olmo3-32b", "olmo3-7b", "olmo3-7b-pt"], "decoder_block olmo3"),
    **dict.fromkeys(["qwen2.5-1.5b", "qwen2.5-14b", "qwen2.5-7b"], "decoder_block qwen2"),
    "qwen3-custom-30b-a3b": "attention_output_dim", "qwen3-next-80b-a3b": "decoder_block qwen3_next (gated delta net)",
    **dict.fromkeys(["qwen3.5-35b-a3b", "qwen3.5-397b-a17b"], "decoder_block qwen3_5"),
}


def _case(name: str):
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=TpusimError,
                                                      reason=f"not modelled yet: {NOT_YET[name]}")) \
        if name in NOT_YET else name


@pytest.mark.parametrize("name", [_case(n) for n in _text_models()])
def test_base_yml_with_each_model_simulates_or_is_refused_physically(name):
    w = workload_from_dict({"base_config": "base.yml", "model_name": name, "per_device_batch_size": 1,
                            "max_target_length": 1024, "ici_fsdp_parallelism": -1}, source=SOURCE)
    assert w.ignored_keys == ()  # base.yml's and the model file's ignored keys are not the user's
    topo = parse_topology("v5p:2x2x2")
    try:
        program = compile_program(w, topo)
    except InfeasibleError as e:
        assert "does not fit in HBM" in e.reason
        return
    s = summarize(simulate(program, topo))
    assert math.isfinite(s["step_time_s"]) and s["step_time_s"] > 0
    assert 0 < s["mfu"] <= 1


def test_known_maxtext_keys_are_never_unknown():
    base = {"base_config": "base.yml", "model_name": "llama2-7b", "per_device_batch_size": 1}
    w = workload_from_dict({**base, "abort_on_inf_loss": True, "sa_block_kv_compute": 1024, "steps": 5},
                           source=SOURCE)
    assert set(w.ignored_keys) == {"abort_on_inf_loss", "steps"}
    assert "sa_block_kv_compute=1024" in w.notes  # (llama2-7b.yml also sets logical_axis_rules: noted too)
    with pytest.raises(TpusimError) as e:
        workload_from_dict({**base, "pipeline_parallel_layers": 4}, source=SOURCE)
    assert e.value.key == "pipeline_parallel_layers" and "not modelled yet" in e.value.reason
    with pytest.raises(TpusimError) as e:
        workload_from_dict({**base, "abort_on_inf_los": True}, source=SOURCE)
    assert e.value.reason == "unknown key (did you mean 'abort_on_inf_loss'?)"


def test_model_file_overrides_base_and_user_overrides_both():
    w = workload_from_dict({"base_config": "base.yml", "model_name": "llama2-7b", "per_device_batch_size": 1,
                            "base_num_decoder_layers": 2}, source=SOURCE)
    assert w.model.d_model == 4096  # the model file's, not base.yml's 2048
    assert w.model.num_layers == 2  # the user's
    assert mx.base_config()["base_emb_dim"] == 2048


def test_missing_base_config_is_one_clear_error(tmp_path):
    with pytest.raises(TpusimError) as e:
        workload_from_dict({"base_config": "nope.yml", "per_device_batch_size": 1}, source=str(tmp_path / "w.yaml"))
    assert e.value.key == "base_config" and "no such file" in e.value.reason


PUBLISHED = yaml.safe_load((__import__("pathlib").Path(__file__).parent / "data" / "published_params.yaml").read_text())
# Where our count misses the published one, and why (strict: remove once it matches).
PARAM_GAPS = {("deepseek2-16b", "active"): "2.451B against the card's 2.4B: 1 M outside half a unit of its rounding; "
                                          "the card may truncate, or count the 2 shared experts differently",
              ("qwen3-30b-a3b", "active"): "3.353B against the card's 3.3B, 3 M outside half a unit of its rounding "
                                           "(235B-A22B's 22.19B matches: the card may truncate)"}


def _published(value) -> tuple[float, float]:
    """(value, tolerance): a string's tolerance is half a unit of its last printed digit, in billions."""
    if isinstance(value, int):
        return float(value), 0.5
    text = str(value)
    mantissa, _, exp = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    scale = 1e9 * 10 ** int(exp or 0)
    return float(mantissa) * scale, 0.5 * 10.0 ** -decimals * scale


def _param_cases():
    for name, entry in PUBLISHED.items():
        for what in ("total", "non_embedding", "active"):
            if what in entry:
                marks = ([pytest.mark.xfail(strict=True, reason=PARAM_GAPS[(name, what)])]
                         if (name, what) in PARAM_GAPS else [])
                yield pytest.param(name, what, id=f"{name}-{what}", marks=marks)


@pytest.mark.parametrize("name,what", list(_param_cases()))
def test_parameter_count_matches_the_published_one(name, what):
    entry = PUBLISHED[name]
    m = workload_from_dict({"model_name": name, "per_device_batch_size": 1}, source=SOURCE).model
    table = m.vocab_size * m.d_model
    ours = {"total": m.params, "non_embedding": m.params - table * (1 if m.tied_embeddings else 2) - m.d_model,
            "active": m.active_params - (table if entry.get("active_without_input_embedding") else 0)}[what]
    value, tol = _published(entry[what])
    if what == "non_embedding":
        tol = max(tol, m.d_model)  # whether the final norm counts as embedding is not said
    assert abs(ours - value) <= tol, f"{name} {what}: ours {ours:,} published {value:,.0f} +- {tol:,.0f}"


@pytest.mark.parametrize("name,layers", [("deepseek3-671b", 5), ("deepseek2-16b", 3), ("llama4-17b-128e", 4),
                                         ("llama4-17b-16e", 2), ("mixtral-8x7b", 2), ("gemma2-2b", 2)])
def test_compiled_matmuls_are_the_model_flops(name, layers):
    """MLA's low-rank projections, shared and routed experts, dense first layers, interleaved MoE: the
    matmuls the compiled step executes (no remat, no tensor split) are exactly the model FLOPs, which
    are 6 x (active parameters - input embedding - norms) per token; attention, 6 B T^2 N (qk + v) L / 2
    by the model-FLOPs convention, of which the splash kernel computes (n + 1) / n: at T = 1024 its two
    512-blocks a side leave one of four blocks empty, so it runs 3/4 of the T x T grid, not 1/2."""
    w = workload_from_dict({"model_name": name, "per_device_batch_size": 1, "max_target_length": 1024,
                            "remat_policy": "none", "base_num_decoder_layers": layers}, source=SOURCE)
    topo = parse_topology("v5p:2x2x2")
    program = compile_program(w, topo, check_memory=False)
    parts = model_flops_breakdown(w, program.tokens_per_step / w.step.seq_len)
    matmuls = topo.num_chips * sum(o.flops for o in program.ops if o.category == "matmul")
    attention = topo.num_chips * sum(o.flops for o in program.ops if o.category == "attention" and o.phase == "forward")
    assert matmuls == pytest.approx(parts["layers"] + parts["unembedding"], rel=1e-12)
    n = 1024 // 512
    assert 3 * attention == pytest.approx(parts["attention"] * (n + 1) / n, rel=1e-12)
    m = w.model
    norms = m.num_layers * m.norm_params_per_layer + m.d_model + (
        m.num_layers * (m.q_lora_rank + m.kv_lora_rank) if m.attention_type == "mla" else 0)
    input_table = 0 if m.tied_embeddings else m.vocab_size * m.d_model  # tied: the table is the unembedding
    per_token = (parts["layers"] + parts["unembedding"]) / program.tokens_per_step
    assert per_token == pytest.approx(6 * (m.active_params - input_table - norms), rel=1e-12)


def _window_blocks(n: int, w: int) -> int:
    """512-blocks a sliding-window kernel computes: query block i needs key blocks i - w .. i."""
    return sum(min(i, w) + 1 for i in range(n))


@pytest.mark.parametrize("name,seq,window,period,local_share,executed_local", [
    # sliding window: (2TW - W^2) / T^2 by the convention; blocks: n = T / 512, w = W / 512
    ("gemma2-2b", 8192, 4096, 2, (2 * 8192 * 4096 - 4096**2) / 8192**2, _window_blocks(16, 8) / 16**2),
    ("gemma3-4b", 8192, 1024, 6, (2 * 8192 * 1024 - 1024**2) / 8192**2, _window_blocks(16, 2) / 16**2),
    # chunks of W: W / T by the convention; blocks: two chunks of 16 blocks, each causal
    ("llama4-17b-16e", 16384, 8192, 4, 8192 / 16384, 2 * (16 * 17 // 2) / 32**2),
])
def test_local_attention_layers_closed_form(name, seq, window, period, local_share, executed_local):
    """Gemma 2 / 3's sliding-window and Llama 4's chunked layers, against the closed form: causal
    attention of a global layer is 6 B T^2 N (qk + v) / 2 by the model-FLOPs convention; a local layer
    does local_share of it. Executed, the splash kernel computes whole 512-blocks: (n + 1) / 2n of the
    grid for a global layer, and for a local one the blocks that meet its window or chunk."""
    w = workload_from_dict({"model_name": name, "per_device_batch_size": 1, "max_target_length": seq,
                            "remat_policy": "none", "base_num_decoder_layers": 12}, source=SOURCE)
    m = w.model
    assert m.sliding_window == window and m.local_period == period
    topo = parse_topology("v5p:2x2x2")
    program = compile_program(w, topo, check_memory=False)
    batch = program.tokens_per_step / seq
    local = sum(1 for i in range(m.num_layers) if (i + 1) % period)
    expected = 6 * batch * seq**2 * m.num_heads * 2 * m.head_dim / 2 * (m.num_layers - local + local * local_share)
    assert model_flops_breakdown(w, batch)["attention"] == pytest.approx(expected, rel=1e-12)
    executed = topo.num_chips * sum(o.flops for o in program.ops if o.category == "attention" and o.phase == "forward")
    n = seq // 512
    grid = 2 * batch * seq**2 * m.num_heads * 2 * m.head_dim
    assert executed == pytest.approx(grid * ((m.num_layers - local) * (n + 1) / (2 * n) + local * executed_local),
                                     rel=1e-12)


@pytest.mark.parametrize("raw,key", [
    ({"base_config": "a\x00b"}, "base_config"), ({"base_config": "y" * 5000}, "base_config"),
    ({"base_config": "models"}, "base_config"), ({"model_name": "../maxtext/base"}, "model_name"),
    ({"model_name": "x" * 5000}, "model_name"), ({"model_name": "a\x00b"}, "model_name"),
])
def test_hostile_names_are_one_clear_error(raw, key):
    with pytest.raises(TpusimError) as e:
        workload_from_dict({**raw, "per_device_batch_size": 1}, source=SOURCE)
    assert e.value.key == key


# ---- global_parameter_scale ------------------------------------------------------------------------

def _dev_entries_with_scale() -> list[dict]:
    dev = yaml.safe_load((__import__("pathlib").Path(__file__).parent / "data" / "measured-dev.yaml").read_text())
    seen, out = set(), []
    for e in dev["entries"] if isinstance(dev, dict) else dev:
        scale = (e.get("model") or {}).get("global_parameter_scale")
        if scale and scale not in seen:
            seen.add(scale)
            out.append(e)
    return out


@pytest.mark.parametrize("entry", _dev_entries_with_scale(), ids=lambda e: e["id"])
def test_global_parameter_scale_gives_the_published_dimensions(entry):
    """MaxText's scripts size their synthetic models by global_parameter_scale on base.yml's dimensions;
    the development set lists what each run's model was (dims and parameter count, 4 significant
    figures): the scale rule must give exactly those dims and the count within its rounding."""
    m = entry["model"]
    w = workload_from_dict({"base_config": "base.yml", "per_device_batch_size": 1,
                            "global_parameter_scale": m["global_parameter_scale"]}, source=SOURCE)
    got = w.model
    assert (got.num_layers, got.d_model, got.num_heads, got.num_kv_heads, got.head_dim, got.d_ff, got.vocab_size) \
        == (m["layers"], m["d_model"], m["q_heads"], m["kv_heads"], m["head_dim"], m["ffn_dim"], m["vocab"])
    total = m["params_total"]
    half_unit = 0.5 * 10 ** (math.floor(math.log10(total)) - 3)  # printed to 4 significant figures
    assert abs(got.params - total) <= half_unit


def test_global_parameter_scale_rotation():
    """MaxText's pyconfig: each doubling doubles in turn heads and MLP, then embedding, then layers."""
    from tpusim.model.build import parameter_scales
    assert [parameter_scales(2 ** i) for i in range(7)] == [
        (0, 0, 0, 0), (0, 1, 1, 0), (1, 1, 1, 0), (1, 1, 1, 1), (1, 2, 2, 1), (2, 2, 2, 1), (2, 2, 2, 2)]
    w = workload_from_dict({"base_config": "base.yml", "per_device_batch_size": 1, "global_parameter_scale": 1024,
                            "base_num_kv_heads": 4}, source=SOURCE)
    # 1024 = 2^10: heads and MLP x8, embedding x8, layers x8 ... then one more heads/MLP doubling
    assert (w.model.d_model, w.model.num_heads, w.model.num_kv_heads, w.model.d_ff, w.model.num_layers) == \
        (2048 * 8, 16 * 16, 4 * 16, 7168 * 16, 16 * 8)


@pytest.mark.parametrize("scale", [3, 0, -2, 2 ** 40])
def test_global_parameter_scale_not_a_power_of_two_is_one_error(scale):
    with pytest.raises(TpusimError) as e:
        workload_from_dict({"base_config": "base.yml", "per_device_batch_size": 1, "global_parameter_scale": scale},
                           source=SOURCE)
    assert e.value.key == "global_parameter_scale"


# ---- remat_policy: custom, tensor by tensor ---------------------------------------------------------

_CUSTOM_BASE = {"base_config": "base.yml", "model_name": "llama2-7b", "base_num_decoder_layers": 4,
                "per_device_batch_size": 2, "topology": "v5p:2x2x1"}


def _step_and_memory(**keys):
    w = workload_from_dict({**_CUSTOM_BASE, **keys}, source=SOURCE)
    topo = parse_topology("v5p:2x2x1")
    prog = compile_program(w, topo, check_memory=False)
    return summarize(simulate(prog, topo))["step_time_s"], prog.memory.total, prog.host_ops


@pytest.mark.parametrize("named, custom", [
    ("full", {}),  # base.yml's per-tensor defaults: everything recomputed but the layer input
    ("save_dot_except_mlp", {"query_proj": "device", "key_proj": "device", "value_proj": "device",
                             "out_proj": "device"}),
    ("minimal", {"query_proj": "device", "key_proj": "device", "value_proj": "device", "out_proj": "device",
                 "mlpwi_0": "device", "mlpwi_1": "device", "mlpwo": "device"}),
    ("qkv_proj_offloaded", {"query_proj": "offload", "key_proj": "offload", "value_proj": "offload"}),
])
def test_custom_remat_equals_the_named_policy_that_saves_the_same_tensors(named, custom):
    """MaxText's named policies are save/offload lists of the same checkpoint names its custom policy
    takes key by key (layers/decoders.py): the same choice must give the same step and memory."""
    t_named, m_named, host_named = _step_and_memory(remat_policy=named)
    t_custom, m_custom, host_custom = _step_and_memory(remat_policy="custom", **custom)
    assert t_custom == pytest.approx(t_named, rel=1e-12)
    assert m_custom == pytest.approx(m_named, rel=1e-12)
    assert [o.bytes for o in host_custom] == [o.bytes for o in host_named]


def test_custom_remat_offloads_what_it_names_and_saves_the_context():
    _, m_full, _ = _step_and_memory(remat_policy="full")
    _, m_ctx, _ = _step_and_memory(remat_policy="custom", context="device")
    tok, q, layers = 2 * 2048, 32 * 128, 4  # llama2-7b: 32 heads of 128; fsdp over 4 chips, 2 sequences each
    # every layer keeps its context; the backward's transient (one layer's residuals) already held one
    assert m_ctx - m_full == pytest.approx((layers - 1) * tok * q * 2)
    _, m_off, host = _step_and_memory(remat_policy="custom", decoder_layer_input="offload", out_proj="offload")
    d = 4096
    # one copy per layer of each (the next layer waits for each before it writes that tensor again)
    assert [o.bytes for o in host if o.category == "copy-to-host"] == [2 * tok * d] * (2 * layers)
    assert m_off < m_full  # the layer inputs left HBM


def test_custom_remat_bad_choice_is_one_error():
    with pytest.raises(TpusimError) as e:
        workload_from_dict({**_CUSTOM_BASE, "remat_policy": "custom", "query_proj": "host"}, source=SOURCE)
    assert e.value.key == "query_proj" and e.value.reason == "'host' is not one of remat, device, offload"


def test_older_maxtext_keys():
    """Keys of 2023-24 MaxText scripts no longer in base.yml: int8_training (AQT's switch before
    quantization) is quantization: int8; the stack-trace and replicator keys change no step."""
    base = {"base_config": "base.yml", "model_name": "llama2-7b", "per_device_batch_size": 1}
    w = workload_from_dict({**base, "int8_training": True, "collect_stack_trace": True}, source=SOURCE)
    assert w.step.quantization == "int8" and "collect_stack_trace" in w.ignored_keys
    assert workload_from_dict({**base, "int8_training": False}, source=SOURCE).step.quantization == ""
    with pytest.raises(TpusimError) as e:
        workload_from_dict({**base, "int8_training": "yes"}, source=SOURCE)
    assert e.value.key == "int8_training"
