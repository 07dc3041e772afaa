"""Peak HBM per device: parameters, gradients, optimizer state, kept activations, transients.

A model, not an allocator: XLA's buffer assignment packs better or worse. The terms follow the book
(training.md, transformers.md): Adam keeps two moments per parameter; remat keeps the layer input
(block remat, 2 BTD L bytes) plus whatever matmul outputs the policy saves; no remat keeps every
intermediate (~20 x BTD per layer in the book's count, here counted tensor by tensor).
"""

from __future__ import annotations

from tpusim.compiler.shapes import OFFLOADED, Shapes
from tpusim.program import Memory
from tpusim.workload import Workload


def layer_activation_bytes(w: Workload, sh: Shapes, *, kept: tuple[str, ...] | None) -> float:
    """Bytes of one layer's activations on one device that remat keeps (kept=None: everything).

    Outputs of the out- and down-projections are kept after their tensor-parallel reduce-scatter
    (D / tensor wide), as XLA stores them in the activations' sharding.
    """
    m = w.model
    tok, d, ab = sh.tok, sh.d, sh.act_bytes
    rows = tok * sh.topk if m.num_experts > 1 else tok
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    widths = {  # tensor -> elements on one device
        "input": tok * d / sh.tp, "q_proj": tok * q, "k_proj": tok * kv, "v_proj": tok * kv,
        "o_proj": tok * d / sh.tp, "mlp_gate": rows * sh.ff if m.gated_mlp else 0, "mlp_up": rows * sh.ff,
        "mlp_down": rows * d / sh.tp,
    }
    if kept is None:  # everything the backward pass reads
        widths.update({"attn_norm": tok * d / sh.tp, "attn_in": tok * d, "attn_out": tok * q,
                       "lse": tok * sh.heads * 2, "residual": tok * d / sh.tp, "mlp_norm": tok * d / sh.tp,
                       "mlp_in": tok * d, "mlp_act": rows * sh.ff})
        if not w.step.flash:  # dense attention keeps its probabilities
            widths["probs"] = sh.seqs * sh.heads * sh.t_local * sh.seq_len
        return ab * sum(widths.values())
    return ab * sum(widths[name] for name in kept)


def layer_working_bytes(w: Workload, sh: Shapes) -> float:
    """The transient peak inside one layer's backward: the wider block's recomputed activations and
    their gradients (MLP: gate, up, activation and two gradients of width F; attention: Q, K, V, the
    output and their gradients), plus two D-wide buffers."""
    m = w.model
    rows = sh.tok * sh.topk if m.num_experts > 1 else sh.tok
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    mlp = rows * ((5 if m.gated_mlp else 3) * sh.ff + 2 * sh.d)
    attn = sh.tok * (4 * q + 4 * kv + 2 * sh.d)
    return sh.act_bytes * max(mlp, attn)


def peak_memory(w: Workload, sh: Shapes, *, local_params: float, gathered_layer_params: float,
                gathered_table_params: float, fsdp: bool) -> Memory:
    s = w.step
    wb = sh.weight_bytes
    # Adam's two moments, in the parameters' dtype unless mu_dtype says otherwise (optax's default);
    # Adafactor's factored second moment is negligible.
    mb = s.moment_bytes
    opt = {"adam": 2.0 * mb, "adamw": 2.0 * mb, "adafactor": 0.0, "sgd": 0.0}[s.optimizer]
    L = w.model.num_layers
    if sh.saved is None:
        kept = L * layer_activation_bytes(w, sh, kept=None)
    elif s.remat_policy == "custom":  # the recipes offload the layer input and the saved dots to host
        kept = 0.0
    elif s.remat_policy in OFFLOADED:  # saved dots live in host memory; HBM keeps the layer input
        kept = L * layer_activation_bytes(w, sh, kept=("input",))
    else:
        kept = L * layer_activation_bytes(w, sh, kept=("input", *sh.saved))
    # Logits and their gradient in the compute dtype (the f32 upcast is fused into the loss), a vocab
    # tile at a time.
    logits = 2 * sh.tok * sh.vocab * sh.act_bytes / s.num_vocab_tiling
    working = max(layer_working_bytes(w, sh), logits)
    ab = sh.act_bytes
    gathered = 0.0
    if fsdp:  # the layer in use and the one being prefetched, or a layer and the (un)embedding table
        gathered = max(2 * gathered_layer_params, gathered_layer_params + gathered_table_params) * ab
    return Memory(params=local_params * wb, grads=local_params * wb, optimizer=local_params * opt,
                  activations=kept, working=working, gathered_weights=gathered)
