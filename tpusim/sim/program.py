"""A per-device Program: the ops one device runs in one step, in order, with what each needs.

Every device of a symmetric run executes the same Program (SPMD), so one Program describes the whole
step; under pipeline parallelism each stage's devices run the ops tagged with their ``stage`` (and
collective-permutes carry activations from one stage to the next). Ops are of two streams:

* ``compute``: run one after another in list order (the TensorCore); FLOPs, HBM bytes, MXU shape.
* ``collective``: asynchronous; a collective may start once its ``deps`` are done (the op after
  which XLA issues it) and the ops that list it in their ``deps`` wait for it (XLA's ``-done``).
* ``host``: asynchronous copies between HBM and host memory over PCIe (``copy-to-host`` /
  ``copy-from-host``, XLA's ``copy-start``/``copy-done`` for host offload), with the same rules.

``deps`` are indices of earlier ops. The engine replays this; the compiler never touches simpy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tpusim.sim.collectives.lowering import Axis

COMPUTE, COLLECTIVE, HOST = "compute", "collective", "host"
ASYNC_STREAMS = (COLLECTIVE, HOST)
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One op on one device. SI units: FLOPs, bytes."""

    index: int
    name: str
    stream: str                 # "compute", "collective" or "host"
    category: str               # matmul, attention, elementwise, embedding, loss, optimizer | collective kind
    layer: int = -1             # decoder layer, -1 outside the layers
    phase: str = "forward"      # forward, backward, optimizer
    flops: float = 0.0          # executed FLOPs on this device (recomputation included)
    hbm_bytes: float = 0.0      # bytes read + written from HBM
    mxu_shape: tuple[int, int, int] | None = None  # (M, K, N) of a matmul on this device
    vpu_flops: float = 0.0      # vector work inside an MXU op (a flash kernel's softmax), run alongside it
    bytes: float = 0.0          # collectives: the book's V (see tpusim.sim.collectives); host copies: bytes moved
    mesh_axes: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()  # physical axes / spans the collective runs over
    deps: tuple[int, ...] = ()
    recompute: bool = False     # a rematerialised forward op run during the backward pass
    mxu_dtype: str = ""         # "" (bf16), "int8" or "fp8": the MXU rate a quantized matmul runs at
    stage: int = 0              # pipeline stage whose devices run it (a collective: whose links carry it)
    shift: int = 1              # a collective-permute: positions along its axis it sends to (+1 next, -1 previous)


_OP_FIELDS = tuple(Op.__dataclass_fields__)
_new, _set = object.__new__, object.__setattr__


def op_copy(op: Op, **changes) -> Op:
    """``dataclasses.replace(op, **changes)`` without re-running ``__init__``: twice as fast, for the
    compilers that copy a template op hundreds of thousands of times (a 16-stage pipeline)."""
    new = _new(Op)
    for name in _OP_FIELDS:
        _set(new, name, changes[name] if name in changes else getattr(op, name))
    return new


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """Peak HBM per device, by what holds it (bytes)."""

    params: float
    grads: float
    optimizer: float
    activations: float          # saved in HBM by the remat policy for the backward, every layer
    working: float              # the transients at the peak: one layer's backward residuals, or the logits
    gathered_weights: float     # whole gathered weights held at the peak (0 for XLA's steps: its
    #                             collective matmuls stream them; see compiler/memory.py)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.working + self.gathered_weights

    def as_dict(self) -> dict[str, float]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "working": self.working,
                "gathered_weights": self.gathered_weights, "total": self.total}


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    name: str
    ops: tuple[Op, ...]
    devices: int                       # devices running this program (chips x slices)
    model_flops_per_step: float        # 6 N T + attention, the MFU numerator (see the compiler)
    tokens_per_step: float
    memory: Memory
    hbm_capacity_bytes: float
    notes: tuple[str, ...] = field(default=())
    # Pipeline parallelism: stages run different programs (the ops with their ``stage``); each stage's
    # devices, its memory, and the plan (schedule, microbatches, repeats) for reports. One stage: SPMD.
    stages: int = 1
    stage_devices: tuple[tuple[int, ...], ...] = field(default=())
    stage_memory: tuple[Memory, ...] = field(default=())
    pipeline: dict | None = None

    @property
    def flops_per_device(self) -> float:
        """Executed FLOPs per device (under a pipeline, the stages' mean: each device runs one stage's ops)."""
        return sum(op.flops for op in self.ops) / self.stages

    @property
    def compute_ops(self) -> list[Op]:
        return [op for op in self.ops if op.stream == COMPUTE]

    @property
    def host_ops(self) -> list[Op]:
        return [op for op in self.ops if op.stream == HOST]

    @property
    def collective_ops(self) -> list[Op]:
        return [op for op in self.ops if op.stream == COLLECTIVE]

    def collectives_summary(self) -> list[dict]:
        """Collectives grouped by kind and mesh axes: count and bytes (the book's V summed)."""
        groups: dict[tuple, dict] = defaultdict(lambda: {"count": 0, "bytes": 0.0})
        for op in self.collective_ops:
            key = (op.category, op.mesh_axes, tuple(str(a) for a in op.axes))
            groups[key]["count"] += 1
            groups[key]["bytes"] += op.bytes
        return [{"kind": k, "mesh_axes": list(m), "axes": list(a), "count": g["count"], "bytes": g["bytes"]}
                for (k, m, a), g in sorted(groups.items())]
