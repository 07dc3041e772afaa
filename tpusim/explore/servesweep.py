"""Sweeps over serving workloads: one ``tpusim serve`` per configuration, one row each.

A workload with a ``serving`` section (:func:`tpusim.serving.workload.is_serving_workload`) is served,
not stepped: :func:`tpusim.explore.sweep.run_task` asks :func:`serving_columns_of` for its configurations' columns,
and :func:`tpusim.explore.sweep.make_sweep` checks its varied keys with :func:`check_serving_vary`.
Everything else (the grid, the journal, resuming, signals, workers) is the training sweep's.

``--vary`` names serving keys flat (:data:`tpusim.serving.workload.SERVING_FLAT_KEYS`: ``concurrency``,
``rate``, ``trace`` replace the arrival as ``tpusim serve``'s options do; ``token_budget``, ``policy``,
``chunked_prefill``, ``paged_kv``, ``max_batch``, ``max_prefills_per_step`` set the batching;
``prefill_replicas`` (0: co-located) and ``transfer`` the disaggregation; ``requests``, ``seed``,
``input_len``, ``output_len``), MaxText's inference keys (``per_device_batch_size``, ``quantization``
(``bf16`` for none), ``quantize_kvcache``, ``max_target_length``, ...), the mesh (``ici_tensor_parallelism``,
``ici_expert_parallelism``, ``ici_fsdp_parallelism`` (2D weight-stationary), ``ici_data_parallelism``) and any
model key, plus ``topology`` and ``mode``.

A value the serving loader refuses on its own (a negative concurrency, an unknown quantization, a
context longer than the model's) refuses the whole sweep before anything runs, with one line: it is
bad input, not a configuration that does not work. Configurations that do not work on the slice (a
mesh the slice cannot hold, a batch whose KV cache does not fit) are rows saying why, as in training
sweeps.

A row holds the inputs, ``status``/``reason`` and every field of ``tpusim serve --json``: nested
mappings with fixed keys as ``parent.key`` columns (``throughput.output_tokens_per_s_per_chip``,
``ttft_s.p50``, ``tpot_s.p99``, ``hbm_per_device.total``, ...), ``arrival`` as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from tpusim.config import unknown_key_reason
from tpusim.errors import TpusimError
from tpusim.serving.workload import INFERENCE_KEYS, SERVING_FLAT_KEYS, is_serving_workload, serve_workload_from_dict

__all__ = ["is_serving_workload", "check_serving_vary", "serving_columns_of", "serving_columns", "SERVING_VARY_KEYS"]

ARRIVAL_KEYS = ("concurrency", "rate", "trace")
SERVING_VARY_KEYS = (*SERVING_FLAT_KEYS, *INFERENCE_KEYS, "ici_tensor_parallelism", "ici_expert_parallelism",
                     "ici_fsdp_parallelism", "ici_data_parallelism", "model_name")
_JSON_FIELDS = ("arrival",)  # mappings whose keys differ between rows (concurrency / rate / trace)


def check_serving_vary(raw: dict, source: str, vary: dict[str, tuple], sweep_keys: tuple[str, ...]) -> list[str]:
    """Refuse (``TpusimError``, source ``--vary``) unknown keys, two arrival keys at once, and values the
    loader refuses on their own; return warnings (keys that do not change performance)."""
    arrival = [k for k in vary if k in ARRIVAL_KEYS]
    if len(arrival) > 1:
        raise TpusimError(f"vary one of {', '.join(ARRIVAL_KEYS)}, not {' and '.join(arrival)}: each replaces the "
                          "arrival", source="--vary")
    try:
        base = serve_workload_from_dict(raw, source=source)
    except TpusimError:
        base = None  # the workload itself is wrong: every row will say why (the varied keys may mend it)
    warnings = []
    for key, values in vary.items():
        if key in sweep_keys:
            continue
        for value in values:
            try:
                sw = serve_workload_from_dict(raw, source=source, overrides={key: value})
            except TpusimError as e:
                if e.reason.startswith(("unknown key", "belongs in section 'step'")):  # a training step key
                    raise TpusimError(f"{key}: {unknown_key_reason(key, SERVING_VARY_KEYS)}: {source} is a serving "
                                      "workload; vary its serving keys (e.g. concurrency, rate, token_budget, "
                                      "per_device_batch_size, quantization, ici_tensor_parallelism), MaxText's, "
                                      "topology or mode", source="--vary") from None
                if base is not None:
                    raise TpusimError(f"{key}={value!r}: {e.message}", source="--vary") from None
                continue
            if value == values[0] and any(k == key or k.endswith(f".{key}") or k.startswith(f"{key} ") for k in sw.ignored_keys):
                warnings.append(f"{key} does not change performance: its rows will be the same")
    return warnings


def serving_columns(summary: dict) -> dict:
    """``tpusim serve --json``'s fields as flat columns: ``parent.key`` for nested mappings (two levels:
    ``hbm_per_device.total``), JSON text for ``arrival`` and lists."""
    out: dict[str, Any] = {}

    def put(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and prefix not in _JSON_FIELDS:
            for sub, x in v.items():
                put(f"{prefix}.{sub}", x)
        elif isinstance(v, (dict, list, tuple)):
            out[prefix] = json.dumps(v)
        else:
            out[prefix] = v

    for k, v in summary.items():
        put(k, v)
    return out


def serving_columns_of(task, overrides: dict, topology: str | None, slices, mode: str) -> dict:
    """``tpusim serve --json``'s fields for one configuration of a serving sweep (a
    :class:`tpusim.explore.sweep.Task`), flat: :func:`tpusim.explore.sweep.run_task` makes the row, as
    for training (the same numbers as ``tpusim serve`` with these values: a test)."""
    from tpusim.serving import serve

    if slices not in (None, 1):
        raise TpusimError(f"{slices!r}: serving runs on one slice (replicas are independent engines; "
                          "disaggregation moves the KV cache over DCN with transfer: dcn)", source="slices")
    sw = serve_workload_from_dict(task.raw, source=task.source, overrides=overrides)
    return serving_columns(serve(sw, topology, mode=mode).summary)
