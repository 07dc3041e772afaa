"""The ``serving`` section of an inference workload: how requests arrive (:class:`Arrival`), their
prompt and output lengths (:class:`LengthDist`), the batching policy (:class:`Batching`) and
prefill / decode disaggregation (:class:`Disaggregation`), each parsed from YAML with one error
naming the key (:mod:`tpusim.serving.workload` reads the rest of the file)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpusim.config import unknown_key_reason
from tpusim.errors import TpusimError

POLICIES = ("continuous", "static")
DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "sharegpt")
TRANSFERS = ("ici", "dcn")


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthDist:
    """Token counts of prompts or outputs: ``fixed`` value; ``uniform`` low..high; ``lognormal`` with this
    mean and sigma (of the log); ``sharegpt`` the ShareGPT mix (see :mod:`tpusim.serving.requests`)."""

    dist: str
    value: int = 0
    low: int = 0
    high: int = 0
    mean: float = 0.0
    sigma: float = 0.0
    max: int = 0          # cap (0: none beyond the workload's lengths), e.g. benchmark_serving's --sharegpt-output-len


@dataclass(frozen=True, slots=True, kw_only=True)
class Arrival:
    """How requests come: ``rate`` (Poisson, requests/s), ``concurrency`` (closed loop: C clients, each
    sends its next request when the last one finishes), or ``trace`` (a CSV of arrival_s, input_tokens,
    output_tokens). ``rate: .inf`` sends everything at once (benchmark_serving's default)."""

    kind: str
    rate_per_s: float = 0.0
    concurrency: int = 0
    trace: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Batching:
    """``continuous``: slots refilled as requests finish; each step is a prefill of waiting prompts (up to
    ``token_budget`` tokens) or a decode of every running request; with ``chunked_prefill`` each step
    decodes every running request and fills the rest of the budget with prompt chunks.
    ``static``: a batch is prefilled together and decoded until its last request ends."""

    policy: str = "continuous"
    max_batch: int = 0            # decode slots per replica; 0 = per_device_batch_size x replica chips
    token_budget: int = 0         # tokens per step; 0 = max_prefill_predict_length
    max_prefills_per_step: int = 0  # prompts one prefill step takes; 0 = as many as the budget holds (JetStream: 1)
    paged_kv: bool = False        # KV cache in pages from a shared pool (vLLM) instead of a max-length slot each
    chunked_prefill: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Disaggregation:
    prefill_replicas: int
    transfer: str = "ici"          # KV cache moved over ICI (same slice) or DCN (another slice)


def _typed(value: Any, typ: type, source: str, key: str) -> Any:
    if typ is float and isinstance(value, str) and value.strip().lower() in (".inf", "inf"):
        return math.inf
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise TpusimError(f"{value!r} is not {names[typ]}", source=source, key=key)
    return value


def _choice(value: str, choices: tuple[str, ...], source: str, key: str) -> str:
    if value not in choices:
        raise TpusimError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}", source=source, key=key)
    return value


def _arrival(spec: Any, source: str, rate, concurrency, trace) -> Arrival:
    given = [(k, v) for k, v in (("rate", rate), ("concurrency", concurrency), ("trace", trace)) if v is not None]
    if len(given) > 1:
        raise TpusimError("give one of --rate, --concurrency, --trace", source=f"--{given[1][0]}")
    if given:
        key, value = given[0]
        spec, where = {key: value}, f"--{key}"
        src, k = where, None
    else:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise TpusimError("one of {rate: R}, {concurrency: C}, {trace: FILE}", source=source, key="serving.arrival")
        src, k = source, f"serving.arrival.{next(iter(spec))}"
    (kind, value), = spec.items()
    if kind == "rate":
        r = _typed(value, float, src, k)
        if not r > 0 or math.isnan(r):
            raise TpusimError(f"{value!r}: a rate must be a positive number of requests per second", source=src, key=k)
        return Arrival(kind="rate", rate_per_s=r)
    if kind == "concurrency":
        c = _typed(value, int, src, k)
        if c < 1:
            raise TpusimError(f"{value!r}: concurrency must be a positive integer", source=src, key=k)
        return Arrival(kind="concurrency", concurrency=c)
    if kind == "trace":
        p = Path(_typed(value, str, src, k))
        if not p.is_absolute() and not given:
            p = Path(source).parent / p
        return Arrival(kind="trace", trace=str(p))
    raise TpusimError(unknown_key_reason(str(kind), ("rate", "concurrency", "trace")), source=source,
                      key=f"serving.arrival.{kind}")


def _dist(spec: Any, source: str, key: str) -> LengthDist:
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = {"dist": "fixed", "value": spec}
    if not isinstance(spec, dict):
        raise TpusimError("expected a token count or {dist: ...}", source=source, key=key)
    dist = _choice(spec.get("dist", ""), DISTRIBUTIONS, source, f"{key}.dist")
    need = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("mean", "sigma"), "sharegpt": ()}[dist]
    for k in spec:
        if k not in ("dist", "max") and k not in need:
            raise TpusimError(unknown_key_reason(str(k), need) + f" for dist {dist}", source=source, key=f"{key}.{k}")
    vals = {}
    for k in need:
        if k not in spec:
            raise TpusimError(f"dist {dist} needs {k}", source=source, key=f"{key}.{k}")
        vals[k] = _typed(spec[k], float if k in ("mean", "sigma") else int, source, f"{key}.{k}")
        if not vals[k] > 0 and not (k == "sigma" and vals[k] == 0):
            raise TpusimError(f"{vals[k]} must be positive", source=source, key=f"{key}.{k}")
    if "max" in spec:
        vals["max"] = _typed(spec["max"], int, source, f"{key}.max")
        if vals["max"] < 1:
            raise TpusimError(f"{vals['max']} must be a positive integer", source=source, key=f"{key}.max")
    if dist == "uniform" and vals["low"] > vals["high"]:
        raise TpusimError(f"low {vals['low']} > high {vals['high']}", source=source, key=f"{key}.low")
    return LengthDist(dist=dist, **vals)


def _batching(spec: Any, source: str) -> Batching:
    if not isinstance(spec, dict):
        raise TpusimError("expected a mapping", source=source, key="serving.batching")
    keys = {"policy": str, "max_batch": int, "token_budget": int, "chunked_prefill": bool, "max_prefills_per_step": int,
            "paged_kv": bool}
    out = {}
    for k, v in spec.items():
        if k not in keys:
            raise TpusimError(unknown_key_reason(str(k), keys), source=source, key=f"serving.batching.{k}")
        out[k] = _typed(v, keys[k], source, f"serving.batching.{k}")
    if "policy" in out:
        _choice(out["policy"], POLICIES, source, "serving.batching.policy")
    for k in ("max_batch", "token_budget", "max_prefills_per_step"):
        if k in out and out[k] < 1:
            raise TpusimError(f"{out[k]} must be a positive integer", source=source, key=f"serving.batching.{k}")
    return Batching(**out)


def _disaggregation(spec: Any, source: str) -> Disaggregation | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or "prefill_replicas" not in spec:
        raise TpusimError("expected {prefill_replicas: N, transfer: ici|dcn}", source=source,
                          key="serving.disaggregation")
    for k in spec:
        if k not in ("prefill_replicas", "transfer"):
            raise TpusimError(unknown_key_reason(str(k), ("prefill_replicas", "transfer")), source=source,
                              key=f"serving.disaggregation.{k}")
    n = _typed(spec["prefill_replicas"], int, source, "serving.disaggregation.prefill_replicas")
    if n < 1:
        raise TpusimError(f"{n} must be a positive integer", source=source, key="serving.disaggregation.prefill_replicas")
    transfer = _choice(spec.get("transfer", "ici"), TRANSFERS, source, "serving.disaggregation.transfer")
    return Disaggregation(prefill_replicas=n, transfer=transfer)
