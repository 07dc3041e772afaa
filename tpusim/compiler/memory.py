"""Peak HBM per device, as XLA allocates it: what is live at the step's peak.

A MaxText step (scanned layers, a remat policy, AdamW on donated state) holds for the whole step the
parameters and the optimizer moments (arguments, updated in place), and from the start of the
backward pass the gradients and every layer's saved activations (one stacked buffer each, freed after
the backward loop). The peak is then the larger of two moments (``traces/aot_memory.py``: XLA's
memory analysis of such steps, checked in ``tests/test_memory_xla.py``):

* the loss: the logits in the compute dtype, a vocabulary tile at a time (their gradient takes the
  logits' buffer: libtpu's compile of the Llama-3.1 8B recipe, ``v6e8_llama31_8b_no_cm``, whose largest
  temporary is one bf16 logits buffer, 6.3 GB, of 9.5 GB of temporaries in all);
* the backward of one layer: everything JAX's autodiff keeps for that layer without remat (the
  "residuals"), less what the policy already saved, since the backward re-runs the layer's forward and
  holds its residuals until the layer's gradients are done.

What the policy saves is what the backward reads: the down-projection's output is never saved (the
layer's output is the next layer's input, and an add needs no residual), so policies naming it keep
nothing for it. Offloading policies keep their tensors in host memory, not HBM. No whole gathered
layer of weights is counted: XLA's FSDP gathers feed collective matmuls (windowed einsums) and its
peaks hold none (12 of 14 on-device cases are within 4% without them; at a small batch XLA
prefetches about one layer more: v6e_4b_full).

Not modelled, for want of a compiled case: expert layers (their residuals counted as a dense MLP's on
the routed rows), non-gated MLPs (four F-wide residuals assumed), sequence parallelism's effect on the
residuals, and what MaxText's own sharding annotations change (it pins the norms' outputs to D / tensor;
the traced step leaves them to XLA, which gathers them).
"""

from __future__ import annotations

from dataclasses import replace

from tpusim.compiler import zero
from tpusim.compiler.shapes import Shapes, offloaded_tensors
from tpusim.sim.program import Memory
from tpusim.model.workload import Workload

F32 = 4  # RMSNorm statistics, the norm's upcast input, attention's log-sum-exp


def _widths(w: Workload, sh: Shapes) -> dict[str, float]:
    """Elements on one device of each tensor a layer's remat policy can save (MaxText's names).

    The layer input and the out-projection output are kept in the activations' sharding (D / tensor,
    MaxText's ``activation_embed -> tensor``)."""
    m = w.model
    tok, d = sh.tok, sh.d
    rows = tok * sh.topk if m.num_experts > 1 else tok
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    return {"input": tok * d / sh.tp, "q_proj": tok * q, "k_proj": tok * kv, "v_proj": tok * kv,
            "o_proj": tok * d / sh.tp, "context": tok * q, "mlp_gate": rows * sh.ff if m.gated_mlp else 0,
            "mlp_up": rows * sh.ff, "mlp_down": rows * d / sh.tp}


def layer_residual_bytes(w: Workload, sh: Shapes) -> float:
    """Bytes one layer keeps for its backward without remat, tensor by tensor as JAX's autodiff keeps
    them (``jax.ad_checkpoint.print_saved_residuals`` on the MaxText-like layer of aot_memory.py):

    * each RMSNorm: its input upcast to float32, the normalised and the scaled output (compute dtype),
      all D wide (gathered over tensor);
    * attention: Q, K, V in the kernel's layout, the kernel's output and the context after the layout
      change, and the float32 log-sum-exp per head and token (flash); dense attention its probabilities;
    * the gated MLP: gate, up, SiLU's three intermediates and the product (six F-wide tensors; four
      without the gate).

    Without remat, ``peak_memory`` adds the weights cast to the compute dtype (this device's shard)
    when they are stored wider: they are residuals too.
    """
    m = w.model
    ab = sh.act_bytes
    t = _widths(w, sh)
    tok = sh.tok
    # The norms run on the activations gathered over tensor (their float32 inputs are full width in
    # XLA's buffers with tensor parallelism: v5e_1b_tp4_minimal), ahead of the column-parallel matmuls.
    norms = 2 * tok * sh.d * (F32 + 2 * ab)
    q = sh.heads * sh.head_dim
    attn = ab * (t["q_proj"] + t["k_proj"] + t["v_proj"] + 2 * tok * q) + F32 * tok * sh.heads
    if not w.step.flash:
        attn += ab * sh.seqs * sh.heads * sh.t_local * sh.seq_len
    rows = tok * sh.topk if m.num_experts > 1 else tok
    mlp = ab * rows * sh.ff * (6 if m.gated_mlp else 4)
    return norms + attn + mlp


def layer_activation_bytes(w: Workload, sh: Shapes, *, kept: tuple[str, ...] | None) -> float:
    """Bytes of one layer's activations on one device that remat keeps (kept=None: no remat, all the
    residuals; else the named tensors, the down-projection's output counted only when asked for by
    name, as the host-offload copies are)."""
    if kept is None:
        return layer_residual_bytes(w, sh)
    t = _widths(w, sh)
    return sh.act_bytes * sum(t[name] for name in kept)


def saved_on_device(w: Workload, sh: Shapes) -> tuple[str, ...]:
    """The tensors the remat policy keeps in HBM for the backward (not offloaded, not dead)."""
    saved = ("input", *(sh.saved or ()))
    offloaded = offloaded_tensors(w.step)
    return tuple(name for name in dict.fromkeys(saved) if name not in offloaded and name != "mlp_down")


def peak_memory(w: Workload, sh: Shapes, *, local_params: float, gathered_layer_params: float,
                gathered_table_params: float, fsdp: bool, capacity_bytes: float | None = None) -> Memory:
    """Peak HBM per device (see the module's docstring). With ``capacity_bytes``, a peak above it whose
    transients can shrink to fit is brought down to it: XLA's rematerialisation pass (TPU's memory
    limit is the HBM) recomputes transients of the backward rather than keep them, down to the
    larger of the logits and two of the widest tensors (one and its gradient); what cannot shrink stays over."""
    s = w.step
    wb = sh.weight_bytes
    # Adam's two moments, in the parameters' dtype unless mu_dtype says otherwise (optax's default);
    # Adafactor's factored second moment is negligible.
    mb = s.moment_bytes
    opt = {"adam": 2.0 * mb, "adamw": 2.0 * mb, "adafactor": 0.0, "sgd": 0.0}[s.optimizer]
    L = w.model.num_layers
    residuals = layer_residual_bytes(w, sh)
    if sh.saved is None:
        kept_layer = residuals
        if wb > sh.act_bytes and not sh.zero_stage:  # the compute-dtype copies of the weights are residuals
            # too (ZeRO-1/2 keep one copy for the whole step: counted in params)
            kept_layer += (local_params / L) * sh.act_bytes
        backward = 0.0
    else:
        kept_layer = layer_activation_bytes(w, sh, kept=saved_on_device(w, sh))
        backward = max(residuals - kept_layer, 0.0)
    # The logits in the compute dtype (the float32 upcast is fused into the loss, and the loss's backward
    # writes their gradient into the same buffer), a vocabulary tile at a time.
    logits = sh.tok * sh.vocab * sh.act_bytes / s.num_vocab_tiling
    working = max(backward, logits)
    del gathered_layer_params, gathered_table_params, fsdp  # see the module's docstring
    params, grads, optimizer = zero.state_bytes(sh, local_params, opt_bytes_per_param=opt)
    if s.optimizer_memory_host_offload:  # the moments come back to HBM only for the optimizer
        optimizer = zero.host_offload_excess(optimizer, L * kept_layer, working)
    mem = Memory(params=params, grads=grads, optimizer=optimizer,
                 activations=L * kept_layer, working=working, gathered_weights=0.0)
    if capacity_bytes is not None and mem.total > capacity_bytes:
        widest = max(_widths(w, sh).values()) * sh.act_bytes
        floor = max(logits, 2 * widest)
        held = mem.total - working
        mem = replace(mem, working=max(floor, min(working, capacity_bytes - held)))
    return mem
