"""Context parallelism as MaxText does it: attention over a sequence split across the context axis.

MaxText's ``ici_context_parallelism`` (tpusim's ``sequence`` mesh axis; ``ici_sequence_parallelism``
is its older name) splits every activation's sequence dimension, and the layers' weights on their
embed dim like fsdp (``embed -> fsdp, fsdp_transpose, context, ...`` in base.yml's rules). Only
attention needs the whole sequence; ``context_parallel_strategy`` says how it gets it:

* ``all_gather`` (base.yml's default): K and V are all-gathered over the context axis before the
  attention kernel and their gradients reduce-scattered after its backward. Per layer and device,
  forward: 2 x (n-1)/n of the layer's K and V (the book's all-gather cost); backward the same for dK, dV.
* ``ring``: K and V travel round the context ring, n-1 collective-permutes of this device's K and V
  shard, each overlapped with the attention on the chunk already here (n kernel calls on T/n keys).
  Forward traffic is the all-gather's, (n-1)/n of K and V; the backward re-circulates K and V
  ((n-1) permutes of the 2 shards) and passes the dK, dV partial sums on after each chunk (n permutes
  of 2 shards, the last one home). The ring
  shifts along one torus axis: a context axis placed on several is refused for ``ring``.

``context_parallel_load_balance`` (default true) reorders the sequence so that each shard holds one
early and one late chunk, and a causal mask leaves every shard the same work. Without it, shard i of
n holds positions [iT/n, (i+1)T/n) whose queries see (i + 1/2) T/n keys on average: the last shard does
(2n-1)/n of the average, and since every layer's collectives wait for it, the step runs at its pace.
tpusim simulates that device: a causal flash kernel's work on global layers times (2n-1)/n (a
sliding window's work is the same on every shard; dense attention computes the whole square anyway).
``ulysses`` and ``usp`` (all-to-all over heads) are not modelled yet.
"""

from __future__ import annotations

from tpusim.errors import TpusimError
from tpusim.model.mesh import Mesh
from tpusim.model.workload import Workload

AXIS = ("sequence",)


def imbalance(w: Workload, n: int, *, local_layer: bool) -> float:
    """The busiest context shard's attention work over the average (1: balanced)."""
    if n == 1 or w.step.context_load_balance or not w.step.flash or local_layer:
        return 1.0
    return (2 * n - 1) / n


def ring(w: Workload, mesh: Mesh) -> bool:
    """Ring attention: the strategy asks for it and there is a context axis to run it on."""
    return w.step.context_strategy == "ring" and mesh.size("sequence") > 1


def check(w: Workload, mesh: Mesh) -> None:
    if not ring(w, mesh):
        return
    if not w.step.flash:
        raise TpusimError(f"'ring' runs a flash kernel per chunk; attention {w.step.attention!r} has none "
                          "(use attention: flash, or context_parallel_strategy: all_gather)", source=w.source,
                          key="context_parallel_strategy")
    if len(mesh.axes_of(*AXIS)) > 1:
        placed = ", ".join(str(a) for a in mesh.axes_of(*AXIS))
        raise TpusimError(f"'ring' shifts along one torus axis but the context axis is placed on {placed}; "
                          "choose a context size that one axis holds, or physical_axes: {sequence: x}",
                          source=w.source, key="context_parallel_strategy")


def ring_forward(b, p: str, *, n: int, kv_bytes: float, layer: int, phase: str, recompute: bool, flops: float,
                 hbm: float, vpu: float, mxu) -> None:
    """n attention chunks, the K and V shard (2 kv_bytes / n) sent on to the next device meanwhile.
    ``kv_bytes`` is one of K or V over the whole sequence; flops, hbm and vpu the whole attention's."""
    arrived = None
    for j in range(n):
        b.wait(arrived)
        send = None
        if j < n - 1:  # pass on the chunk in hand while computing on it
            send = b.collective(f"collective-permute/{p}/kv_ring_{j}", "collective-permute", v=2 * kv_bytes / n,
                                mesh_axes=AXIS, layer=layer, phase=phase, deps=(b.last_compute, arrived))
        b.compute(f"{p}/attention/ring_{j}", "attention", flops=flops / n, hbm=hbm / n, layer=layer, phase=phase,
                  mxu=mxu, recompute=recompute, vpu=vpu / n)
        arrived = send


def ring_backward(b, p: str, *, n: int, kv_bytes: float, layer: int, flops: float, hbm: float, vpu: float,
                  mxu) -> None:
    """n backward chunks. K and V travel on as in the forward (overlapped with the chunk); the dK, dV
    partial sums of the chunk go on once it is done, and the next chunk waits for them (it adds into
    them); after the last, the finished dK, dV go home. (n-1) x 2 + n x 2 shards in all."""
    kv_in = dkv_in = None
    for j in range(n):
        b.wait(kv_in, dkv_in)
        kv_out = None
        if j < n - 1:
            kv_out = b.collective(f"collective-permute/{p}/kv_ring_{j}", "collective-permute", v=2 * kv_bytes / n,
                                  mesh_axes=AXIS, layer=layer, phase="backward", deps=(b.last_compute, kv_in))
        b.compute(f"{p}/attention/ring_{j}", "attention", flops=flops / n, hbm=hbm / n, layer=layer,
                  phase="backward", mxu=mxu, vpu=vpu / n)
        dkv_out = b.collective(f"collective-permute/{p}/dkv_ring_{j}", "collective-permute", v=2 * kv_bytes / n,
                               mesh_axes=AXIS, layer=layer, phase="backward", deps=(b.last_compute, dkv_in))
        kv_in, dkv_in = kv_out, dkv_out
    b.wait(dkv_in)
