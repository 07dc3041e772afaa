"""Inference workloads: the model and its sharding in MaxText's keys, plus how requests arrive and are batched.

A serving YAML has the training workload's ``model`` and ``sharding`` sections (read by
:func:`tpusim.model.workload.workload_from_dict`, so ``model_name`` presets and every model key work as
they do for ``tpusim run``), an ``inference`` section in MaxText's inference keys, and a
``serving`` section::

    name: serve_llama2_70b
    chip: v5e
    topology: v5e:4x8
    model: {model_name: llama2-70b}
    inference:
      max_prefill_predict_length: 1024   # longest prompt (MaxText)
      max_target_length: 2048            # prompt + output, the KV cache's length (MaxText)
      per_device_batch_size: 6           # decode slots per chip (MaxText)
      quantization: int8                 # "" (bf16), int8 (int8 x int8 MXU), int8_weight_only, int4_weight_only, fp8
      quantize_kvcache: true             # KV cache in kv_quant_dtype (int8, int4 or fp8) instead of dtype
    sharding: {ici_tensor_parallelism: 8}  # the rest of the slice: ici_data_parallelism = replicas
    serving:
      seed: 0
      requests: 1000
      arrival: {concurrency: 64}         # or {rate: 2.0} (Poisson, requests/s) or {trace: file.csv}
      input_len: {dist: sharegpt}        # or {dist: fixed, value: N}, uniform low/high, lognormal mean/sigma
      output_len: {dist: fixed, value: 256}
      batching: {policy: continuous, token_budget: 2048, chunked_prefill: false, paged_kv: false}
      disaggregation: {prefill_replicas: 1, transfer: ici}

Replicas: ``ici_data_parallelism`` (and ``dcn_data_parallelism``) copies of the model, each on
``tensor x expert x fsdp`` chips with its own scheduler (a departure from MaxText's lock-step data axis,
which serving frameworks run as independent engines). ``ici_fsdp_parallelism`` > 1 is 2D
weight-stationary sharding (:mod:`tpusim.serving.twod`): MaxText's rules put the weights' ``embed``
dimension on fsdp and ``mlp`` / ``heads`` / ``vocab`` on tensor; the weights stay where they are and
the activations move (book inference.md Q7), not FSDP's weight gathers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpusim.config import read_yaml, unknown_key_reason
from tpusim.limits import MAX_REQUESTS
from tpusim.errors import TpusimError
from tpusim.model.spec import DTYPE_BYTES, Workload
from tpusim.model.workload import workload_from_dict
from tpusim.serving.spec import (Arrival, Batching, Disaggregation, LengthDist, _arrival, _batching, _choice,
                                 _disaggregation, _dist, _typed)

QUANTIZATIONS = ("", "int8", "int8_weight_only", "int4_weight_only", "fp8")
# Bytes per stored weight / KV element by format (int4: two per byte, as AQT and JetStream pack them).
WEIGHT_BYTES = {"int8": 1.0, "int8_weight_only": 1.0, "fp8": 1.0, "int4_weight_only": 0.5}
KV_QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}

# The context each preset was trained for (its model card); a longer max_target_length is refused.
MODEL_CONTEXT = {
    "llama2-7b": 4096, "llama2-13b": 4096, "llama2-70b": 4096,   # Llama 2 paper, Touvron et al. 2023, sec. 2.2
    "llama3-8b": 8192, "llama3-70b": 8192,                        # Meta Llama 3 model card
    "llama3.1-8b": 131072, "llama3.1-70b": 131072, "llama3.1-405b": 131072,  # Llama 3.1 model card
    "mixtral-8x7b": 32768,                                        # Mixtral of Experts, Jiang et al. 2024
    "gemma-2b": 8192, "gemma-7b": 8192,                           # Gemma report, Gemma Team 2024, table 1
}

_INFERENCE_KEYS: dict[str, tuple[type, Any]] = {
    "max_prefill_predict_length": (int, 1024),
    "max_target_length": (int, 2048),
    "per_device_batch_size": (float, None),
    "dtype": (str, "bfloat16"),
    "quantization": (str, ""),
    "quantize_kvcache": (bool, False),
    "kv_quant_dtype": (str, "int8"),
    "max_context_length": (int, None),  # the model's trained context, for models without a preset
    # MaxText's serving options (base.yml's inference group) that change what tpusim serve simulates:
    "use_chunked_prefill": (bool, False),  # -> serving.batching.chunked_prefill, unless the batching says
    "prefill_chunk_size": (int, None),     # -> the token budget of a chunked step, unless the batching says
    "enable_prefix_caching": (bool, False),  # refused when true (below)
    "multi_sampling": (bool, False),         # refused when true (below)
}
# MaxText serving options tpusim does not model: true is refused ("not modelled yet"), as base.yml keys are
# for training (tpusim/model/maxtext.py); the rest of base.yml's inference group (sampling, kernels'
# block sizes, microbenchmark and server settings) does not change the simulated steps and is ignored.
_SERVING_REFUSED = {
    "enable_prefix_caching": "prefix caching (a prompt whose prefix is cached skips that part of its prefill)",
    "multi_sampling": "several samples per prompt",
}
# MaxText's inference_server values: the interleaved server is co-located serving; the disaggregated one
# needs tpusim's serving.disaggregation to say how many replicas prefill and over what the KV cache moves.
_DISAGGREGATED_SERVER = "ExperimentalMaxtextDisaggregatedServer"
_INFERENCE_IGNORED = ("attention", "weight_dtype", "model_call_mode", "scan_layers", "tokenizer_path",
                      "inference_server", "enable_model_warmup", "checkpoint_is_quantized", "kv_quant_axis",
                      "replicate_quant_scale", "sharding_strategy", "allow_split_physical_axes")
_SERVING_KEYS = ("seed", "requests", "arrival", "input_len", "output_len", "batching", "disaggregation",
                 "step_overhead_s")
_TOP_KEYS = ("name", "description", "chip", "topology", "slices", "base_config", "model", "inference", "sharding",
             "serving")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeWorkload:
    name: str
    source: str
    workload: Workload             # model, sharding (and the step's dtype) for the shared compiler pieces
    max_prefill_len: int
    max_target_len: int
    per_device_batch_size: float | None
    quantization: str
    kv_dtype: str
    context_limit: int | None
    seed: int
    requests: int
    arrival: Arrival
    input_len: LengthDist
    output_len: LengthDist
    batching: Batching
    disaggregation: Disaggregation | None = None
    step_overhead_s: float = 0.0   # host time per step (0: device time only)
    ignored_keys: tuple[str, ...] = field(default=())

    @property
    def weight_bytes(self) -> float:
        return WEIGHT_BYTES[self.quantization] if self.quantization else DTYPE_BYTES[self.workload.step.dtype]

    @property
    def kv_bytes(self) -> float:
        return KV_QUANT_BYTES.get(self.kv_dtype) or DTYPE_BYTES[self.kv_dtype]

    @property
    def int8_math(self) -> bool:
        """MaxText's ``quantization: int8`` quantizes activations too, so matmuls run at the int8 MXU rate."""
        return self.quantization == "int8"


# The keys a sweep varies (``--vary KEY=...``) besides MaxText's: where each goes in the ``serving`` section.
# ``concurrency`` / ``rate`` / ``trace`` replace the arrival (as serve's options do); ``prefill_replicas: 0``
# removes disaggregation (co-located serving); ``input_len`` / ``output_len`` take a token count (fixed).
SERVING_FLAT_KEYS: dict[str, tuple[str, ...]] = {
    "concurrency": ("arrival",), "rate": ("arrival",), "trace": ("arrival",),
    "requests": (), "seed": (), "step_overhead_s": (), "input_len": (), "output_len": (),
    "policy": ("batching",), "max_batch": ("batching",), "token_budget": ("batching",),
    "chunked_prefill": ("batching",), "max_prefills_per_step": ("batching",), "paged_kv": ("batching",),
    "prefill_replicas": ("disaggregation",), "transfer": ("disaggregation",),
}
INFERENCE_KEYS = tuple(_INFERENCE_KEYS)


def load_serve_workload(path: str | Path, *, rate: float | None = None, concurrency: int | None = None,
                        trace: str | None = None, requests: int | None = None,
                        overrides: dict[str, Any] | None = None) -> ServeWorkload:
    """Read a serving YAML; ``rate`` / ``concurrency`` / ``trace`` / ``requests`` override its ``serving``."""
    path = Path(path)
    raw = read_yaml(path)
    return serve_workload_from_dict(raw, source=str(path), rate=rate, concurrency=concurrency, trace=trace,
                                    requests=requests, overrides=overrides)


def is_serving_workload(raw: Any) -> bool:
    """A workload is served (``tpusim serve``, serving sweeps and searches) when it has a ``serving`` section."""
    return isinstance(raw, dict) and "serving" in raw


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """``raw`` with flat keys set where they belong: ``SERVING_FLAT_KEYS`` in ``serving``, MaxText's inference
    keys in ``inference``, ``ici_*`` / ``dcn_*`` in ``sharding``, any other key in ``model`` (the model
    loader then says whether MaxText knows it)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    maxtext_style = "base_config" in raw
    overrides = dict(overrides)
    mesh_keys = {"ici_tensor_parallelism", "ici_expert_parallelism", "ici_fsdp_parallelism"}
    if (mesh_keys & set(overrides) and "ici_data_parallelism" not in overrides
            and -1 not in (overrides.get("ici_tensor_parallelism"), overrides.get("ici_expert_parallelism"))):
        overrides["ici_data_parallelism"] = -1  # a replica of another size: the replicas are the rest of the slice
    for key, value in overrides.items():
        if key in SERVING_FLAT_KEYS:
            srv = out["serving"] = dict(out.get("serving") or {})
            where = SERVING_FLAT_KEYS[key]
            if where == ("arrival",):
                srv["arrival"] = {key: value}
            elif where == ("disaggregation",):
                if key == "prefill_replicas" and value == 0:
                    srv.pop("disaggregation", None)
                    continue
                srv["disaggregation"] = {**(srv.get("disaggregation") or {}), key: value}
            elif where:
                srv[where[0]] = {**(srv.get(where[0]) or {}), key: value}
            else:
                srv[key] = value
        elif maxtext_style:
            out[key] = value  # flat, as MaxText's command line sets it
        else:
            section = ("inference" if key in _INFERENCE_KEYS or key in _INFERENCE_IGNORED else
                       "sharding" if key.startswith(("ici_", "dcn_")) else "model")
            out[section] = {**(out.get(section) or {}), key: value}
    return out


def serve_workload_from_dict(raw: Any, *, source: str, rate: float | None = None, concurrency: int | None = None,
                             trace: str | None = None, requests: int | None = None,
                             overrides: dict[str, Any] | None = None) -> ServeWorkload:
    """A serving workload from its mapping. With ``base_config`` (a MaxText config, e.g. one of
    ``workloads/maxtext/inference/``) the file may set MaxText's keys flat, as MaxText's command line
    does: its inference keys (and the chain's) are read here, the other keys go to the model loader,
    which models, ignores or refuses each as for training (:mod:`tpusim.model.maxtext`)."""
    if not isinstance(raw, dict):
        raise TpusimError("a serving workload is a mapping of keys to values", source=source)
    if overrides:
        raw = with_overrides(raw, overrides)
    maxtext_style = "base_config" in raw
    chain: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for key in raw:
        if key in _TOP_KEYS:
            continue
        if not maxtext_style:
            raise TpusimError(unknown_key_reason(str(key), _TOP_KEYS) + " (MaxText's flat keys need base_config)",
                              source=source, key=str(key))
        flat[str(key)] = raw[key]
    if maxtext_style:
        from tpusim.model.workload import maxtext_chain

        chain = maxtext_chain(raw["base_config"], source)
    inf = {**{k: chain[k] for k in _INFERENCE_KEYS if k in chain},
           **{k: flat.pop(k) for k in list(flat) if k in _INFERENCE_KEYS}, **_section(raw, "inference", source)}
    server = flat.get("inference_server", chain.get("inference_server"))
    ignored = [k for k in list(flat) if k in _INFERENCE_IGNORED]
    for k in ignored:
        del flat[k]
    values: dict[str, Any] = {}
    for key, v in inf.items():
        if key in _INFERENCE_IGNORED:
            ignored.append(f"inference.{key}")
            continue
        if key not in _INFERENCE_KEYS:
            raise TpusimError(unknown_key_reason(str(key), _INFERENCE_KEYS), source=source, key=f"inference.{key}")
        if key == "quantization" and v == "bf16":
            v = ""
        values[key] = _typed(v, _INFERENCE_KEYS[key][0], source, f"inference.{key}")
    for key, (_, default) in _INFERENCE_KEYS.items():
        values.setdefault(key, default)
    for key, what in _SERVING_REFUSED.items():
        if values[key]:
            raise TpusimError(f"{values[key]!r}: not modelled yet for serving ({what}); MaxText's default is false",
                              source=source, key=key if maxtext_style else f"inference.{key}")
    sharding = {**{k: flat.pop(k) for k in list(flat) if k.startswith(("ici_", "dcn_"))},
                **_section(raw, "sharding", source)}
    if sharding.get("ici_sequence_parallelism", 1) != 1:
        raise TpusimError("ici_sequence_parallelism is not modelled for serving (use tensor, fsdp, expert and data)",
                          source=source, key="sharding.ici_sequence_parallelism")
    # ici_fsdp_parallelism is the D split of 2D weight-stationary serving (serving/twod.py), 1 unless set
    # here: base.yml's -1 (training's "the rest of the slice") is not the chain's choice for a replica
    fsdp = sharding.setdefault("ici_fsdp_parallelism", 1)
    if not (isinstance(fsdp, int) and not isinstance(fsdp, bool) and fsdp >= 1):
        raise TpusimError(f"{fsdp!r}: the 2D weight-stationary split must be a positive integer (the rest of the "
                          "slice is ici_data_parallelism: replicas)", source=source, key="sharding.ici_fsdp_parallelism")
    if "ici_tensor_parallelism" not in sharding and "ici_data_parallelism" not in sharding:
        sharding["ici_tensor_parallelism"] = -1  # one replica over the whole slice
    elif sharding.get("ici_tensor_parallelism") != -1:
        sharding.setdefault("ici_data_parallelism", -1)
    if maxtext_style:
        sharding.setdefault("dcn_data_parallelism", 1)
    step = {"per_device_batch_size": values["per_device_batch_size"] or 1.0,
            "max_target_length": values["max_target_length"], "dtype": values["dtype"], "weight_dtype": values["dtype"]}
    if maxtext_style:  # the chain's attention kernel (vllm_rpa, ...) is a serving kernel: the serving step
        step["attention"] = "dot_product"  # costs attention itself, so the training loader must not judge it
    top = {k: raw[k] for k in ("name", "description", "chip", "topology", "slices", "base_config") if k in raw}
    w = workload_from_dict({**top, **flat, "model": _section(raw, "model", source), "step": step, "sharding": sharding},
                           source=source)
    m = w.model
    unmodelled = [what for what, on in (("multi-head latent attention", m.attention_type == "mla"),
                                        ("shared experts", m.shared_experts > 0),
                                        ("dense layers among MoE layers", 0 < m.moe_layers < m.num_layers),
                                        ("local attention layers", m.local_layers > 0)) if on]
    if unmodelled:  # the serving step builds uniform GQA layers
        raise TpusimError(f"{m.name}: not modelled yet for serving: {', '.join(unmodelled)}", source=source,
                          key="model.model_name")
    for key in ("max_prefill_predict_length", "max_target_length"):
        if values[key] < 1:
            raise TpusimError(f"{values[key]} must be a positive integer", source=source, key=f"inference.{key}")
    if values["max_prefill_predict_length"] >= values["max_target_length"]:
        raise TpusimError(f"the longest prompt ({values['max_prefill_predict_length']}) leaves no room for output "
                          f"in max_target_length {values['max_target_length']}", source=source,
                          key="inference.max_prefill_predict_length")
    limit = values["max_context_length"] or MODEL_CONTEXT.get(w.model.name)
    if limit is not None and values["max_target_length"] > limit:
        raise TpusimError(f"{values['max_target_length']} tokens is longer than {w.model.name}'s context of {limit}",
                          source=source, key="inference.max_target_length")
    pdbs = values["per_device_batch_size"]
    if pdbs is not None and not pdbs > 0:
        raise TpusimError(f"{pdbs!r} must be a positive number", source=source, key="inference.per_device_batch_size")
    quant = _choice(values["quantization"], QUANTIZATIONS, source, "inference.quantization")
    kv_dtype = values["dtype"]
    if values["quantize_kvcache"]:
        kv_dtype = _choice(values["kv_quant_dtype"], tuple(KV_QUANT_BYTES), source, "inference.kv_quant_dtype")

    srv = _section(raw, "serving", source)
    for key in srv:
        if key not in _SERVING_KEYS:
            raise TpusimError(unknown_key_reason(str(key), _SERVING_KEYS), source=source, key=f"serving.{key}")
    seed = _typed(srv.get("seed", 0), int, source, "serving.seed")
    n_req = requests if requests is not None else _typed(srv.get("requests", 1000), int, source, "serving.requests")
    if not 1 <= n_req <= MAX_REQUESTS:
        raise TpusimError(f"{n_req} must be a positive number of requests, at most {MAX_REQUESTS:,}",
                          source="--requests" if requests is not None else source,
                          key=None if requests is not None else "serving.requests")
    arrival = _arrival(srv.get("arrival", {"concurrency": 1}), source, rate, concurrency, trace)
    inp = _dist(srv.get("input_len", {"dist": "sharegpt"}), source, "serving.input_len")
    out = _dist(srv.get("output_len", {"dist": "sharegpt"}), source, "serving.output_len")
    batching = _batching(srv.get("batching", {}), source)
    if values["use_chunked_prefill"] and "chunked_prefill" not in (srv.get("batching") or {}):
        batching = dataclasses.replace(batching, chunked_prefill=True,
                                       token_budget=batching.token_budget or values["prefill_chunk_size"] or 0)
    disagg = _disaggregation(srv.get("disaggregation"), source)
    if server == _DISAGGREGATED_SERVER and disagg is None:
        raise TpusimError(f"{server}: MaxText's disaggregated server: say how in serving.disaggregation "
                          "(prefill_replicas: N, transfer: ici|dcn)", source=source, key="inference_server")
    overhead = _typed(srv.get("step_overhead_s", 0.0), float, source, "serving.step_overhead_s")
    if overhead < 0:
        raise TpusimError(f"{overhead} must be >= 0", source=source, key="serving.step_overhead_s")
    return ServeWorkload(name=w.name, source=source, workload=w, max_prefill_len=values["max_prefill_predict_length"],
                         max_target_len=values["max_target_length"], per_device_batch_size=pdbs, quantization=quant,
                         kv_dtype=kv_dtype, context_limit=limit, seed=seed, requests=n_req, arrival=arrival,
                         input_len=inp, output_len=out, batching=batching, disaggregation=disagg,
                         step_overhead_s=overhead, ignored_keys=tuple(ignored) + w.ignored_keys)


def _section(raw: dict, name: str, source: str) -> dict:
    v = raw.get(name, {})
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TpusimError("expected a mapping", source=source, key=name)
    return v
