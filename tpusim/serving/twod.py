"""2D weight-stationary serving steps: every weight split over D and over F (heads, vocab), never moved.

Book inference.md, Appendix B and Q7 (after Pope et al. 2022, "Efficiently Scaling Transformer
Inference", sec. 3.2.2). A replica's mesh is ``fsdp`` x ``tensor``: the book's X (each weight's D
dimension, MaxText's ``embed -> fsdp``) and YZ (F, heads and vocab, MaxText's ``mlp`` / ``heads`` /
``vocab -> tensor``). Between blocks the residual stream is split over both, [M, D_XYZ]. Per layer and
device, with V in the book's convention and ``ab`` bytes per activation:

* attention: all-gather over YZ to [M, D_X] (V = ab M D / X); Q/K/V projection [D_X, heads_YZ] gives
  partial sums over X, all-reduced over X (V = ab M (N + 2K) H / YZ); attention over the YZ shard's
  heads, as in the 1D layout (the KV cache split over YZ: the X chips of a group hold the same shard);
  O projection [heads_YZ, D_X]: partial sums over YZ, reduce-scattered over YZ to [M, D_XYZ].
* MLP: all-gather over YZ (V = ab M D / X); W_in [D_X, F_YZ] (gated: two of them) gives partial sums,
  reduce-scattered over X to [M, F_XYZ] (V = ab M F / YZ per input matrix); the activation there;
  all-gathered over X to [M, F_YZ] (V = ab M F / YZ); W_out [F_YZ, D_X]: partial sums over YZ,
  reduce-scattered over YZ (V = ab M D / X). For a plain MLP in bf16 this is the book's
  T = 2BD/(X W) + 4BF/(YZ W) with each term times the (n-1)/n of its group (the book's large-axis
  form drops it): the YZ collectives run on two torus axes at once (2W), the X ones on one (W).
* the norms' sums of squares over D need a sum over X as well: they ride along with the partial sums
  that are summed over X anyway (a row's scale commutes with the next matmul), M numbers beside
  M x D / X, so they are no collective of their own (the book counts none).
* outside the layers: the table [vocab_YZ, D_X] is looked up and reduce-scattered over YZ
  (V = ab M D / X); the unembedding gathers the sampled rows over YZ, reduce-scatters its logits'
  partial sums over X, and each chip's best candidates are gathered over the replica.

Dense models only: experts under 2D weight-stationary sharding are refused.
"""

from __future__ import annotations

import dataclasses

from tpusim.errors import TpusimError
from tpusim.model.mesh import Mesh
from tpusim.model.spec import Model
from tpusim.sim.program import COLLECTIVE, COMPUTE, Op


def check_2d(model: Model, mesh: Mesh, source: str) -> None:
    """Refuse a 2D mesh that does not divide the model, naming the key (one TpusimError)."""
    x, y = mesh.ici["fsdp"], mesh.ici["tensor"]
    key = "ici_fsdp_parallelism"
    if model.num_experts > 1 or mesh.ici["expert"] > 1:
        raise TpusimError(f"{x}: 2D weight-stationary serving is modelled for dense models only "
                          f"({model.name} with ici_expert_parallelism {mesh.ici['expert']}, {model.num_experts} "
                          "experts); use tensor and expert", source=source, key=key)
    if model.d_model % x:
        raise TpusimError(f"d_model {model.d_model} is not divisible by ici_fsdp_parallelism {x} (2D "
                          "weight-stationary splits every weight's D over it)", source=source, key=key)
    if model.d_ff % y:
        raise TpusimError(f"the MLP width {model.d_ff} is not divisible by ici_tensor_parallelism {y}",
                          source=source, key="ici_tensor_parallelism")
    for what, size in (("d_model", model.d_model), ("the MLP width", model.d_ff)):
        if size % (x * y):
            raise TpusimError(f"{what} {size} is not divisible by ici_fsdp_parallelism x ici_tensor_parallelism "
                              f"= {x} x {y} (2D weight-stationary splits the activations between blocks over "
                              "both)", source=source, key=key)


def ops_2d(m, n_decode: int, decode_ctx: float, prefill_tokens: int, prefill_pairs: float, prefill_ctx: float,
           n_logits: int) -> tuple[list[Op], list[Op]]:
    """(one layer's ops, the ops outside the layers) of ``m``'s (a :class:`StepModel`) 2D step, per device."""
    mdl, sh, ab, wb = m.model, m.sh, m.ab, m.wb
    D, H, X, Y = mdl.d_model, mdl.head_dim, m.fsdp, m.tp
    hl, kvl, fl, vl = sh.heads, sh.kv_heads, sh.ff, sh.vocab
    dx, dn = D // X, D // (X * Y)
    inputs = mdl.mlp_matrices - 1  # W_in matrices (gate and up, or one)
    M = n_decode + prefill_tokens
    yz, xs = m.tensor_axes, m.fsdp_axes
    layer: list[Op] = []

    def mm(out, name, k, n, rows=M):
        out.append(Op(index=len(out), name=name, stream=COMPUTE, category="matmul", flops=2.0 * rows * k * n,
                      hbm_bytes=wb * k * n + ab * rows * (k + n), mxu_shape=(max(rows, 1), k, n)))

    def coll(out, name, kind, nbytes, axes, groups=Y):
        if groups > 1 and nbytes > 0:
            out.append(Op(index=len(out), name=name, stream=COLLECTIVE, category=kind, bytes=nbytes, axes=axes))

    def elementwise(name, flops, nbytes):
        layer.append(Op(index=len(layer), name=name, stream=COMPUTE, category="elementwise", flops=flops,
                        hbm_bytes=nbytes))

    # the residual add of the block before and this block's norm, on [M, D_XYZ]
    elementwise("norm_residual_attn", 6.0 * M * dn, 4.0 * ab * M * dn)
    coll(layer, "attn_all_gather", "all-gather", ab * M * dx, yz)
    mm(layer, "qkv_proj", dx, (hl + 2 * kvl) * H)
    coll(layer, "qkv_all_reduce", "all-reduce", ab * M * (hl + 2 * kvl) * H, xs, X)
    layer += m.attention_ops(n_decode, decode_ctx, prefill_tokens, prefill_pairs, prefill_ctx)
    mm(layer, "o_proj", hl * H, dx)
    coll(layer, "attn_reduce_scatter", "reduce-scatter", ab * M * dx, yz)
    elementwise("norm_residual_mlp", 6.0 * M * dn, 4.0 * ab * M * dn)
    coll(layer, "mlp_all_gather", "all-gather", ab * M * dx, yz)
    mm(layer, "mlp_in", dx, inputs * fl)
    coll(layer, "mlp_reduce_scatter", "reduce-scatter", ab * M * inputs * fl, xs, X)
    elementwise("mlp_activation", 4.0 * M * fl / X, 2.0 * ab * M * fl / X)
    coll(layer, "mlp_all_gather_hidden", "all-gather", ab * M * fl, xs, X)
    mm(layer, "mlp_out", fl, dx)
    coll(layer, "mlp_reduce_scatter_out", "reduce-scatter", ab * M * dx, yz)
    layer = [dataclasses.replace(op, index=i) for i, op in enumerate(layer)]

    outside = [Op(index=0, name="embed", stream=COMPUTE, category="embedding", hbm_bytes=(wb + ab) * M * dx)]
    coll(outside, "embed_reduce_scatter", "reduce-scatter", ab * M * dx, yz)
    coll(outside, "unembed_all_gather", "all-gather", ab * n_logits * dx, yz)
    mm(outside, "unembed", dx, vl, rows=n_logits)
    coll(outside, "logits_reduce_scatter", "reduce-scatter", ab * n_logits * vl, xs, X)
    coll(outside, "sample_all_gather", "all-gather", 8.0 * n_logits * X * Y, m.mesh.axes_of("fsdp", "tensor"),
         X * Y)
    return layer, outside
