"""Quantized training as MaxText configures it: ``quantization: int8 | fp8 | nanoo_fp8`` (AQT).

What is quantized (the ASSUMPTION, from MaxText's ``quantizations.py`` as of e591f30's base.yml, whose
source tpusim does not carry): ``int8`` is AQT's ``config_v3(fwd_bits=8, dlhs_bits=8, drhs_bits=8)``
with int32 accumulation: the forward matmul, the backward's dgrad (``dlhs``) and its wgrad (``drhs``)
all run int8 x int8 on the MXU; ``quantization_local_shard_count: 0`` drops the wgrad quantization
(``drhs_bits=None``, bf16), its default -1 (the slice count) keeps it. ``fp8`` and ``nanoo_fp8``
(Flax's fp8 dot-general ops, e4m3 forward, e5m2 gradients) are modelled the same way at the chip's
fp8 rate. Quantized are the layers' dense projections (attention Q/K/V/O, MLA's low-rank projections,
the MLP and expert matrices); the attention kernel (QK^T, PV), the router and the unembedding stay
bf16 (MaxText's flash/splash kernel and its logits dense take no quantization config).

Per quantized matmul (M, K, N), dynamic (per-step) quantization with per-channel absmax scales:

* each operand (M x K and K x N elements; the weight is re-quantized for the dgrad, whose contraction
  runs over the other axis) is quantized on the VPU: ``QUANT_VPU_OPS`` per element (|x|, the max
  reduction, x / scale, round-clip-cast) reading it twice (the absmax pass, then the scaling pass) in
  the compute dtype and writing one byte;
* the matmul reads 1-byte operands, runs at the chip's int8 / fp8 MXU peak (``ChipSpec``, datasheet
  figures), and dequantizes its int32 accumulator in its epilogue (``DEQUANT_VPU_OPS`` per output
  element: convert, scale) alongside the MXU work, writing the compute dtype.

Under FSDP the 8-bit operand is what moves: libtpu quantizes each device's shard of a weight (after
a tiny all-gather of the per-channel max) and gathers 1-byte shards, for the forward and again for
the dgrad (``traces/aot_int8.py``: int8 weight shards in collective-permutes of windowed einsums,
no bf16 gather left); :func:`gathered_bytes`. The quantize op still counts the whole gathered weight
(an upper bound on that VPU work). Weights, gradients, optimizer state and saved activations keep their dtypes (AQT's training mode
quantizes on the fly; its int8 checkpoints are for serving). Chips without an fp8 MXU mode (every TPU
here but TPU7x) refuse fp8: see :func:`check_chip`.
"""

from __future__ import annotations

from tpusim.errors import TpusimError
from tpusim.model.workload import Workload
from tpusim.sim.chips import ChipSpec

QUANT_VPU_OPS = 4     # per quantized element: abs, max-reduce, multiply by 1/scale, round-clip-cast
DEQUANT_VPU_OPS = 2   # per output element: int32 -> f32 convert, multiply by the two scales' product
QUANTIZED_BYTES = 1   # int8, fp8 (e4m3 / e5m2)
# The matmuls AQT quantizes: the layers' dense projections, by their names in the compiled program.
QUANTIZED_WEIGHTS = frozenset("""q_proj k_proj v_proj o_proj q_a q_b kv_a kv_b mlp_gate mlp_up mlp_down
shared_gate shared_up shared_down""".split())


def mxu_dtype(quantization: str) -> str:
    """The MXU mode a quantized matmul runs in ("" for bf16)."""
    return {"": "", "int8": "int8", "fp8": "fp8", "nanoo_fp8": "fp8"}[quantization]


def check_chip(w: Workload, chip: ChipSpec) -> None:
    """fp8 training on a chip without an fp8 MXU mode is refused, naming the chip and what it has."""
    if mxu_dtype(w.step.quantization) == "fp8" and not chip.fp8_flops_per_s:
        raise TpusimError(f"{w.step.quantization!r}: {chip.display_name} has no fp8 MXU mode (its 8-bit rate "
                          f"is int8, {chip.int8_flops_per_s / 1e12:.0f} TOP/s); use quantization: int8, or a chip "
                          "with fp8 (tpu7x)", source=w.source, key="quantization")


def quantized(w: Workload, name: str) -> str:
    """The MXU dtype of the matmul called ``name`` in the program ("": bf16). Names end in the weight's
    name (forward, recomputation) or in ``<weight>/dgrad`` / ``<weight>/wgrad`` (backward)."""
    q = mxu_dtype(w.step.quantization)
    if not q:
        return ""
    parts = name.rsplit("/", 2)
    grad = parts[-1] in ("dgrad", "wgrad")
    weight = parts[-2] if grad else parts[-1]
    if weight not in QUANTIZED_WEIGHTS or (parts[-1] == "wgrad" and not w.step.quantize_wgrad):
        return ""
    return q


def gathered_bytes(w: Workload, weight: str, act_bytes: int) -> int:
    """Bytes per element of a weight's FSDP all-gather: 1 once its matmuls are quantized."""
    return QUANTIZED_BYTES if quantized(w, weight) else act_bytes


def quantized_matmul(b, name: str, m_: float, k_: float, n_: float, *, dtype: str, act_bytes: int, layer: int,
                     phase: str, recompute: bool, deps) -> int:
    """Quantize both operands (one VPU op), then the 8-bit matmul; returns the matmul's index."""
    elems = m_ * k_ + k_ * n_
    b.compute(f"{name}/quantize", "elementwise", flops=QUANT_VPU_OPS * elems,
              hbm=elems * (2 * act_bytes + QUANTIZED_BYTES), layer=layer, phase=phase, recompute=recompute,
              deps=deps)
    idx = b.compute(name, "matmul", flops=2 * m_ * k_ * n_, hbm=QUANTIZED_BYTES * elems + act_bytes * m_ * n_,
                    mxu=(int(m_), int(k_), int(n_)), layer=layer, phase=phase, recompute=recompute,
                    vpu=DEQUANT_VPU_OPS * m_ * n_, mxu_dtype=dtype)
    return idx
