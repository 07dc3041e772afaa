"""ZeRO stages over the data axes, as MaxText expresses them: what each device keeps and what it sends.

The Ultra-Scale Playbook's (and the ZeRO paper's) stages, in MaxText's keys. Psi is the parameters one
replica holds (its shard over fsdp, tensor, ...), N the devices of the data axes (``ici_data_parallelism``
x ``dcn_data_parallelism``), w the weights' bytes (``weight_dtype``: MaxText's f32 master weights),
a the compute dtype's (``dtype``: bf16), o Adam's moments' bytes per parameter (2 x ``mu_dtype``):

================  ====================================  ===============  ==========  ==========  =======================
stage             keys                                  params           grads       optimizer   data-axis traffic/step
================  ====================================  ===============  ==========  ==========  =======================
DP                ``ici/dcn_data_parallelism``          w Psi            w Psi       o Psi       all-reduce of gradients
ZeRO-1            + ``shard_optimizer_over_data: true``  a Psi + w Psi/N  a Psi       o Psi/N     reduce-scatter + all-gather
ZeRO-2            + ``shard_gradients_over_data: true``  a Psi + w Psi/N  a Psi/N     o Psi/N     reduce-scatter + all-gather
ZeRO-3 (FSDP)     ``ici/dcn_fsdp_parallelism``          w Psi/N          w Psi/N     o Psi/N     all-gather x 2 + reduce-scatter
================  ====================================  ===============  ==========  ==========  =======================

With w = 4, a = 2, o = 8 (MaxText's defaults) that is the ZeRO paper's 16 Psi, 4 Psi + 12 Psi/N,
2 Psi + 14 Psi/N and 16 Psi/N: MaxText's f32 parameters are the paper's "fp32 master copy", which in
plain DP are the only copy (the bf16 one is cast afresh each step, a transient), and from ZeRO-1 on
live sharded with the moments beside a replicated bf16 compute copy, whose gradients are bf16.

The ZeRO-1/2 step (what ``shard_optimizer_over_data`` makes XLA compile, as far as its sharding
propagation goes: the optimizer reads only its shard of each gradient, so the gradient all-reduce
becomes a reduce-scatter): each layer's gradient is reduce-scattered over the data axes as soon as it
exists (where DP all-reduces it); the optimizer updates this device's 1/N of the master weights and
moments, casts them to the compute dtype, and all-gathers the compute copy over the data axes, after
the optimizer, exposed (the next step's forward needs all of it). ZeRO-1 and ZeRO-2 are the same
program; ZeRO-1 holds the backward's whole gradient buffer (XLA's scan writes every layer's gradient
at the compute copy's sharding before the reduce-scatters read it), ZeRO-2 only the shards.
libtpu compiles exactly that for a bf16 copy beside sharded f32 master weights and moments
(``traces/aot_zero.py``: reduce-scatter of the bf16 gradient, all-gather of the new bf16 copy).
Traffic per device, as ring all-reduce equivalents: DP 2 Psi, ZeRO-1/2 Psi + Psi = 2 Psi, ZeRO-3
3 Psi (the Playbook's figures).

``optimizer_memory_host_offload`` keeps the moments in host memory between steps: copied in over
PCIe after the backward, updated, copied back; HBM holds them only during the optimizer, when the
activations are gone.

MaxText has no key for ZeRO-2: ``shard_gradients_over_data`` is tpusim's (documented in the README).
``param_scan_axis`` (which dimension of the stacked layer weights is the layer axis) is a layout
choice and stays a noted key.
"""

from __future__ import annotations

from tpusim.compiler.shapes import Shapes
from tpusim.model.workload import Workload

DATA_AXES = ("data", "dcn_data")


def state_bytes(sh: Shapes, local_params: float, *, opt_bytes_per_param: float) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per device for ``sh.zero_stage`` (see the module's table)."""
    wb, ab = sh.weight_bytes, sh.act_bytes
    if not sh.zero_stage:
        return local_params * wb, local_params * wb, local_params * opt_bytes_per_param
    n = sh.data_shards
    # The replicated compute copy exists only when the master weights are wider than the compute dtype.
    params = local_params * ab + local_params * wb / n if wb > ab else local_params * wb
    grads = local_params * ab / (n if sh.zero_stage == 2 else 1)
    return params, grads, local_params * opt_bytes_per_param / n


def host_offload_excess(moments: float, activations: float, working: float) -> float:
    """HBM the offloaded moments need at the optimizer beyond what the backward's peak already had:
    peak = max(params + grads + activations + working, params + grads + moments)."""
    return max(0.0, moments - activations - working)


def grad_reduction_kind(sh: Shapes) -> str:
    """The collective that reduces a gradient over the data axes."""
    return "reduce-scatter" if sh.zero_stage else "all-reduce"


def optimizer(b, w: Workload, sh: Shapes, local_params: float, *, flops_per_param: float,
              moment_bytes_per_param: float) -> None:
    """The optimizer update on this device's shard; for ZeRO-1/2 then the cast and all-gather of the
    compute copy; with host offload the moments' copies in and out. ``b`` is the program builder."""
    wb, ab = sh.weight_bytes, sh.act_bytes
    n = sh.data_shards if sh.zero_stage else 1
    shard = local_params / n
    fetched = None
    if w.step.optimizer_memory_host_offload and moment_bytes_per_param:
        fetched = b.host_copy("copy-from-host/optimizer_state", "copy-from-host",
                              nbytes=shard * moment_bytes_per_param, layer=-1, phase="optimizer",
                              deps=(b.last_compute,))
        b.wait(fetched)
    # read p, g, m, v; write p, m, v (the gradient in the compute dtype once ZeRO holds a bf16 copy)
    grad_bytes = ab if sh.zero_stage else wb
    cast = ab if sh.zero_stage and wb > ab else 0  # write the new compute copy
    opt = b.compute(f"optimizer/{w.step.optimizer}", "optimizer", flops=flops_per_param * shard,
                    hbm=(2 * wb + grad_bytes + 2 * moment_bytes_per_param + cast) * shard, phase="optimizer")
    pending = []
    if fetched is not None:
        pending.append(b.host_copy("copy-to-host/optimizer_state", "copy-to-host",
                                   nbytes=shard * moment_bytes_per_param, layer=-1, phase="optimizer", deps=(opt,)))
    if sh.zero_stage:
        pending.append(b.collective("all-gather/zero/updated_params", "all-gather", v=local_params * min(wb, ab),
                                    mesh_axes=DATA_AXES, phase="optimizer", deps=(opt,)))
    if any(p is not None for p in pending):  # the step ends when the new state is in place
        b.wait(*pending)
        b.compute("optimizer/state_ready", "optimizer", flops=0, hbm=0, phase="optimizer")
