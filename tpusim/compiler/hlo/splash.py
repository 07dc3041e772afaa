"""Pallas splash-attention kernels in XLA's HLO, priced as tpusim's own flash attention op.

XLA compiles jax's splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``, the kernel
MaxText calls) to ``custom-call``\\ s with ``custom_call_target="tpu_custom_call"``; the kernel is opaque to
XLA, so its FLOPs are nowhere in the HLO. What the HLO does give: the kernel's name
(``splash_{mha,mqa}_{fwd,dq,dkv}[_segmented]_{residuals,no_residuals}``, jax's ``get_kernel_name``, in the
instruction's name and its ``op_name``), its operands (``data_next``, ``block_mask`` [, ``mask_next``]
as small integer arrays, then q, k, v as ``[..., heads, T, head_dim]``, then the backward's residuals and
dO), its results, and its block sizes in ``frontend_attributes`` (``kernel_metadata``'s
``xprof_metadata`` JSON: ``block_q``/``block_kv`` forward, ``block_q_dkv``/``block_kv_dkv``,
``block_q_dq``/``block_kv_dq``, layouts).

Each kernel is priced as :func:`tpusim.compiler.transformer.build_ops` prices the same kernel: QK^T and
PV over the share of the T x T grid the kernel computes (``FLASH_DKV_MATMULS``, ``FLASH_DQ_MATMULS``,
``FLASH_FUSED_BWD_MATMULS`` of them in the backward), the softmax's vector ops per score
(``FLASH_VPU_OPS_*``) run alongside on the VPU, MXU shape (tokens, head_dim, T), category attention. Its
HBM bytes stay the importer's (what the kernel's operands and results move). The share of the grid:

* the ``block_mask`` operand's non-zero blocks, when it is a constant whose literal the HLO prints
  (XLA prints arrays of more than a few elements as ``{...}``);
* otherwise a causal mask, counted as :meth:`tpusim.model.spec.Model.flash_fraction` counts it (every
  block that holds an unmasked score, whole: (n + 1) / 2n of the grid for n blocks a side);
* the whole grid for a kernel without a block mask (jax passes none when no block is empty).

A dkv kernel with a ``dq`` result (one rank above q: ``use_fused_bwd_kernel``) is the fused backward.
Other ``tpu_custom_call``\\ s (Pallas kernels tpusim does not know) stay priced by their bytes alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from tpusim.compiler.hlo.analysis import _Analysis
from tpusim.compiler.hlo.parse import Instr, array_shapes
from tpusim.compiler.transformer import (
    FLASH_DKV_MATMULS,
    FLASH_DQ_MATMULS,
    FLASH_FUSED_BWD_MATMULS,
    FLASH_VPU_OPS_BWD,
    FLASH_VPU_OPS_BWD_DQ,
    FLASH_VPU_OPS_FWD,
)
from tpusim.errors import TpusimError
from tpusim.limits import MAX_FLASH_BLOCKS
from tpusim.model.spec import block_fraction

PALLAS_TARGET = '"tpu_custom_call"'
_SPLASH_RE = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)(?:_segmented)?(?:_no)?(?:_residuals)?")
_INT_DTYPES = ("s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64")
_FLOAT_DTYPES = ("bf16", "f16", "f32", "f64") + tuple(f"f8{s}" for s in ("e4m3fn", "e5m2", "e4m3", "e3m4"))
SEQ_MINOR = 2  # jax's QKVLayout.SEQ_MINOR: [..., head_dim, T]
# Matmuls per kernel, in units of one of the forward's two (QK^T, PV), and vector ops per score.
_MATMULS = {"fwd": 2, "dkv": FLASH_DKV_MATMULS, "dq": FLASH_DQ_MATMULS, "fused_bwd": FLASH_FUSED_BWD_MATMULS}
_VPU_OPS = {"fwd": FLASH_VPU_OPS_FWD, "dkv": FLASH_VPU_OPS_BWD, "dq": FLASH_VPU_OPS_BWD_DQ,
            "fused_bwd": FLASH_VPU_OPS_BWD}
# The xprof_metadata keys of each kernel's block sizes (jax's BlockSizes).
_BLOCK_KEYS = {"fwd": ("block_q", "block_kv"), "dkv": ("block_q_dkv", "block_kv_dkv"),
               "dq": ("block_q_dq", "block_kv_dq"), "fused_bwd": ("block_q_dkv", "block_kv_dkv")}


@dataclass(frozen=True)
class KernelCost:
    """A splash kernel priced as tpusim's attention op (FLOPs on the MXU, vector ops on the VPU)."""

    kind: str                       # fwd, dkv, dq or fused_bwd
    flops: float
    vpu_flops: float
    mxu_shape: tuple[int, int, int]
    fraction: float                 # share of the T x T score grid the kernel computes
    mask: str                       # "constant" (its block mask read), "causal" (assumed) or "none"


def is_pallas(ins: Instr) -> bool:
    return ins.opcode == "custom-call" and ins.attrs.get("custom_call_target") == PALLAS_TARGET


def kernel_name(ins: Instr) -> str:
    """The kernel's name: the scope before ``/pallas_call`` in its op_name, else the instruction's name."""
    m = re.search(r'op_name="(?:[^"]*/)?([^"/]+)/pallas_call"', ins.attrs.get("metadata", ""))
    return m.group(1) if m else ins.name


def _xprof(ins: Instr) -> dict:
    """The kernel's ``xprof_metadata`` (block sizes, layouts); {} when absent or unreadable."""
    m = re.search(r'"xprof_metadata":("(?:[^"\\]|\\.)*")', ins.attrs.get("frontend_attributes", ""))
    try:
        meta = json.loads(json.loads(m.group(1))) if m else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def kernel_cost(ins: Instr, an: _Analysis) -> KernelCost | None:
    """The splash kernel ``ins`` priced as tpusim's attention op; None if it is not one tpusim can read
    (another Pallas kernel, or q, k, v not found among its operands)."""
    if not is_pallas(ins):
        return None
    m = _SPLASH_RE.search(kernel_name(ins)) or _SPLASH_RE.search(ins.name)
    if not m:
        return None
    arrays = [(an.operand_instr(ins, i), *a) for i, a in enumerate(_operand_arrays(ins, an))]
    first_float = next((i for i, (_, dt, _) in enumerate(arrays) if dt in _FLOAT_DTYPES), None)
    if first_float is None or len(arrays) < first_float + 3:
        return None
    masks = [a for a in arrays[:first_float] if a[1] in _INT_DTYPES]
    meta = _xprof(ins)
    q, k, v = (_head_minor(dims, meta.get(f"{n}_layout")) for n, (_, _, dims) in
               zip("qkv", arrays[first_float:first_float + 3]))
    if min(len(q), len(k), len(v)) < 2 or min(q + k + v) < 1:
        return None
    kind = m.group(1)
    if kind == "dkv" and any(len(dims) > len(q) for _, dims in array_shapes(ins.result_type)):
        kind = "fused_bwd"  # (its dq_unreduced: one dq per kv block, a rank above q)
    t_q, t_kv, rows = q[-2], k[-2], math.prod(q[:-1])
    bq, bkv = (_int(meta.get(key)) for key in _BLOCK_KEYS[kind])
    fraction, how = _fraction(masks[1] if len(masks) > 1 else (masks[0] if masks else None), an, t_q, t_kv, bq, bkv)
    full = 2.0 * rows * t_kv * (q[-1] + v[-1])  # QK^T and PV over the whole grid (transformer's attn_fwd_flops)
    tokens = rows // q[-3] if len(q) >= 3 else rows  # (the MXU shape is per head: tokens x head_dim x T)
    return KernelCost(kind=kind, flops=full / 2 * _MATMULS[kind] * fraction,
                      vpu_flops=_VPU_OPS[kind] * rows * t_kv * fraction,
                      mxu_shape=(int(tokens), int(q[-1]), int(t_kv)), fraction=fraction, mask=how)


def _operand_arrays(ins: Instr, an: _Analysis) -> list[tuple[str, tuple[int, ...]]]:
    """One (dtype, dims) per operand (a tuple-typed operand, which a kernel does not take, gives its first)."""
    out = []
    for i in range(len(ins.operands)):
        src = an.operand_instr(ins, i)
        arrays = array_shapes(src.result_type) if src is not None else array_shapes(ins.operands[i])
        out.append(arrays[0] if arrays else ("", ()))
    return out


def _head_minor(dims: tuple[int, ...], layout) -> tuple[int, ...]:
    return (*dims[:-2], dims[-1], dims[-2]) if layout == SEQ_MINOR and len(dims) >= 2 else dims


def _int(x) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def _fraction(mask, an: _Analysis, t_q: int, t_kv: int, bq: int | None, bkv: int | None) -> tuple[float, str]:
    """(share of the grid computed, how it was found) for a kernel whose block mask is ``mask``
    ((producer, dtype, dims) of the operand, or None)."""
    if mask is None:
        return 1.0, "none"
    producer, _, dims = mask
    grid = dims[-2:] if len(dims) >= 2 else (1, 1)
    bq = min(bq or -(-t_q // max(grid[0], 1)), t_q)  # (MaxText takes each block as min(sa_block_*, T))
    bkv = min(bkv or -(-t_kv // max(grid[1], 1)), t_kv)
    if -(-t_q // bq) > MAX_FLASH_BLOCKS:
        raise TpusimError(f"a splash attention kernel with {-(-t_q // bq):,} query blocks; tpusim counts the blocks "
                          f"of at most {MAX_FLASH_BLOCKS:,}")
    values = block_mask_literal(producer, an)
    if values and len(values) == math.prod(dims):
        heads = math.prod(dims[:-2]) if len(dims) > 2 else 1  # (one mask per head, or one for all)
        computed = sum(1 for x in values if x != 0)  # (blocks of the whole grid, however jax shrank it)
        return min(1.0, computed * bq * bkv / (heads * t_q * t_kv)), "constant"
    if t_q != t_kv:
        return 1.0, "none"  # (a causal mask over unequal lengths: not modelled, the whole grid)
    return block_fraction(t_q, bq, bkv, 0, False), "causal"


_CARRY = ("copy", "copy-done", "copy-start", "bitcast", "reshape", "convert")


def block_mask_literal(ins: Instr | None, an: _Analysis, *, hops: int = 64) -> list[int] | None:
    """The values of the constant behind ``ins`` (through copies, tuples, and loop-invariant state of
    the while loops it is carried into), or None when it is not a constant or its literal is elided."""
    path: list[int] = []  # tuple indices still to take, innermost last
    cur = ins
    for _ in range(hops):
        if cur is None:
            return None
        if cur.opcode == "get-tuple-element":
            index = cur.attrs.get("index", "")
            if not index.isdigit():
                return None
            path.append(int(index))
            cur = an.operand_instr(cur, 0)
        elif cur.opcode == "tuple" and path:
            cur = an.operand_instr(cur, path.pop())
        elif cur.opcode == "parameter":
            cur = _argument(cur, an, path)
        elif cur.opcode in _CARRY and not path:
            cur = an.operand_instr(cur, 0)
        elif cur.opcode == "constant" and not path:
            text = " ".join(cur.operands)
            if "..." in text:
                return None
            return [int(x) for x in re.findall(r"-?\d+", text)]
        else:
            return None
    return None


def _argument(param: Instr, an: _Analysis, path: list[int]) -> Instr | None:
    """What a computation's parameter is bound to by its caller: a fusion's or call's operand, or a
    while loop's initial state when the body passes that element through unchanged."""
    callers = an.callers.get(param.computation) or []
    if not callers:
        return None
    caller = callers[0]
    n = param.operands[0] if param.operands else ""
    if not n.isdigit():
        return None
    n = int(n)
    if caller.opcode in ("fusion", "call"):
        return an.operand_instr(caller, n)
    if caller.opcode != "while" or not path:
        return None
    root = an.root.get(caller.attrs.get("body", "").lstrip("%"))
    kept = an.operand_instr(root, path[-1]) if root is not None and root.opcode == "tuple" else None
    if (kept is None or kept.opcode != "get-tuple-element" or kept.attrs.get("index") != str(path[-1])
            or (an.operand_instr(kept, 0) or kept).opcode != "parameter"):
        return None  # the loop may change it: not a constant
    return an.operand_instr(caller, 0)


def notes(kernels) -> list[str]:
    """The importer's notes on the Pallas kernels it priced, ``(instruction, kernel_cost(...))`` pairs: how
    each splash kernel's grid share was found, and the kernels priced by their bytes alone."""
    priced: dict[tuple[str, float], list[str]] = {}
    unknown: dict[str, int] = {}
    for ins, cost in kernels:
        if cost is None:
            unknown[kernel_name(ins)] = unknown.get(kernel_name(ins), 0) + 1
        else:
            priced.setdefault((cost.mask, round(cost.fraction, 4)), []).append(ins.name)
    out = []
    why = {"constant": "counted from its block mask's non-zero blocks",
           "causal": "its block mask is not a readable constant, so a causal mask is assumed: every block that "
                     "holds an unmasked score, whole, as tpusim's compiler counts them",
           "none": "no block mask (or a causal one over unequal lengths): the whole grid"}
    for (how, frac), names in sorted(priced.items()):
        out.append(f"splash attention kernels priced as tpusim's flash attention op over {frac:.1%} of the "
                   f"score grid ({why[how]}): {', '.join(sorted(names))}")
    if unknown:
        out.append("Pallas kernels (tpu_custom_call) tpusim does not know, priced by their HBM bytes alone (no FLOPs): "
                   + ", ".join(f"{k} (x{n})" for k, n in sorted(unknown.items())))
    return out
