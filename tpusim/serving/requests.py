"""The requests of a serving run: arrival times and prompt / output lengths, drawn from a seeded Generator.

The ShareGPT mix (``dist: sharegpt``) is what serving benchmarks send (vLLM's and JetStream's
``benchmark_serving.py`` with the ShareGPT_V3 conversations): log-normal lengths with sigma 1 (an
assumed shape: ShareGPT's lengths span two decades), with medians set so the means match what the
published run in ``tests/data/measured-dev-2.yaml`` (id recipes-vllm-llama3.1-8b-v6e-4-sharegpt-2025-02)
itself reports: (total - output) tokens/s x duration / 1000 prompts = 224 prompt tokens per request,
and output tokens/s x duration / 1000 = 133 output tokens with outputs capped at 256. The lengths set
the workload, not the speed: nothing in the timing is fitted on that run.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from tpusim.errors import TpusimError
from tpusim.serving.workload import LengthDist, ServeWorkload

SHAREGPT_SIGMA = 1.0
SHAREGPT_INPUT_MEDIAN = 144.7   # mean 224 when prompts are capped at 1024 (sigma 1)
SHAREGPT_OUTPUT_MEDIAN = 113.6  # mean 133 when outputs are capped at 256, 180 at 1024 (sigma 1)
MIN_TOKENS = 4                  # benchmark_serving drops prompts and outputs shorter than 4 tokens


@dataclass(frozen=True, slots=True)
class Requests:
    """Request i arrives at ``arrival_s[i]`` (NaN: sent by a closed-loop client when one is free)."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.input_tokens)


def _draw(d: LengthDist, n: int, rng: np.random.Generator, cap: int, median: float, source: str, key: str,
          limit: str) -> np.ndarray:
    cap = min(cap, d.max) if d.max else cap
    if d.dist == "fixed" and d.value > cap or d.dist == "uniform" and d.high > cap:
        raise TpusimError(f"{d.value or d.high} tokens is longer than {limit} ({cap})", source=source, key=key)
    if d.dist == "fixed":
        x = np.full(n, d.value, dtype=np.int64)
    elif d.dist == "uniform":
        x = rng.integers(d.low, d.high + 1, size=n)
    elif d.dist == "lognormal":  # mean of the distribution given; mu = ln(mean) - sigma^2 / 2
        x = np.rint(rng.lognormal(np.log(d.mean) - d.sigma**2 / 2, d.sigma, size=n)).astype(np.int64)
    else:
        x = np.rint(rng.lognormal(np.log(median), SHAREGPT_SIGMA, size=n)).astype(np.int64)
    return np.clip(x, MIN_TOKENS if d.dist in ("lognormal", "sharegpt") else 1, cap)


def make_requests(sw: ServeWorkload) -> Requests:
    """Draw ``sw.requests`` requests (or read the trace). Prompts are capped at the longest prefill and
    outputs at what is left of ``max_target_length``; a trace that exceeds either is refused."""
    rng = np.random.default_rng(sw.seed)
    a = sw.arrival
    if a.kind == "trace":
        rows = read_trace(a.trace)[: sw.requests]
        arr = np.array([r[0] for r in rows], dtype=float)
        inp = np.array([r[1] for r in rows], dtype=np.int64)
        out = np.array([r[2] for r in rows], dtype=np.int64)
        for i, (n_in, n_out) in enumerate(zip(inp, out)):
            if n_in > sw.max_prefill_len:
                raise TpusimError(f"a prompt of {n_in} tokens is longer than max_prefill_predict_length "
                                  f"{sw.max_prefill_len}", source=a.trace, key=f"line {i + 2}")
            if n_in + n_out > sw.max_target_len:
                raise TpusimError(f"{n_in} + {n_out} tokens is longer than max_target_length {sw.max_target_len}",
                                  source=a.trace, key=f"line {i + 2}")
        return Requests(arr, inp, out)
    n = sw.requests
    inp = _draw(sw.input_len, n, rng, sw.max_prefill_len, SHAREGPT_INPUT_MEDIAN, sw.source, "serving.input_len",
                "max_prefill_predict_length")
    out = _draw(sw.output_len, n, rng, sw.max_target_len - sw.max_prefill_len, SHAREGPT_OUTPUT_MEDIAN, sw.source,
                "serving.output_len", "what max_target_length leaves after the longest prompt")
    if a.kind == "rate":
        if np.isinf(a.rate_per_s):
            arr = np.zeros(n)
        else:
            arr = np.cumsum(rng.exponential(1.0 / a.rate_per_s, size=n))
            arr -= arr[0]
    else:
        arr = np.full(n, np.nan)
    return Requests(arr, inp, out)


def read_trace(path: str) -> list[tuple[float, int, int]]:
    """A CSV with a header ``arrival_s,input_tokens,output_tokens``; rows sorted by arrival, times >= 0."""
    from tpusim.safeio import read_text

    text = read_text(path, what="a CSV trace")  # a regular file (a FIFO would block), bounded, UTF-8
    rows = list(csv.reader(text.splitlines()))
    want = ["arrival_s", "input_tokens", "output_tokens"]
    if not rows or [c.strip() for c in rows[0]] != want:
        raise TpusimError(f"the first line must be the header {','.join(want)}", source=path, key="line 1")
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise TpusimError(f"expected 3 columns, got {len(row)}", source=path, key=f"line {i}")
        try:
            t, n_in, n_out = float(row[0]), int(row[1]), int(row[2])
        except ValueError:
            raise TpusimError(f"{','.join(row)!r}: arrival_s is a number, token counts are integers", source=path,
                              key=f"line {i}") from None
        if not t >= 0 or not math.isfinite(t) or n_in < 1 or n_out < 1:
            raise TpusimError("arrival_s must be >= 0 and token counts >= 1", source=path, key=f"line {i}")
        if out and t < out[-1][0]:
            raise TpusimError(f"arrival {t} is before the previous row's {out[-1][0]} (sort by arrival)", source=path,
                              key=f"line {i}")
        out.append((t, n_in, n_out))
    if not out:
        raise TpusimError("no requests in the trace", source=path)
    return out
