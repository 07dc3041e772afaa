"""The book's per-step rooflines of one sharding plan ("How To Scale Your Model", training.md and
applied-training.md), which :mod:`tpusim.explore.search` prunes with and ranks its budget by: a lower
bound at peak rates (a plan whose bound per token is far above the best estimate cannot win) and an
estimate at the calibrated efficiencies."""

from __future__ import annotations

from dataclasses import dataclass

REMAT_RECOMPUTE = {"full": 4 / 3}  # executed / model FLOPs: full remat runs the forward twice


@dataclass(frozen=True, slots=True, kw_only=True)
class Roofline:
    """The book's per-step times of one plan on one device (s), and the numbers they come from."""

    compute_s: float
    critical_s: float     # tensor, sequence, expert collectives: on the critical path
    overlapped_s: float   # FSDP gathers / reduce-scatters, DP all-reduces: hidden behind compute if short
    lower_s: float
    estimate_s: float
    tokens_per_chip: float
    fsdp_axes: int
    tensor_axes: int
    fsdp_limit_tokens: float  # alpha / (n_fsdp_axes x tensor): below it, FSDP is communication-bound
    tensor_ratio: float       # Y alpha / (n_tensor_axes F): above 1, tensor parallelism is


def roofline(w, topo, mesh, sh, *, mxu_eff: float = 1.0, link_eff: float = 1.0, dcn_eff: float = 1.0,
             microbatches: int = 1) -> Roofline:
    """Per-step roofline of workload ``w`` on ``mesh`` (:class:`~tpusim.model.mesh.Mesh`, shapes ``sh``).

    Compute: model FLOPs per device (x 4/3 for full remat) / C. Per collective, the bytes through one
    device's links, V (n - 1) / n (all-reduce twice), over W_ici x the torus axes it spans (DCN: the
    chip's DCN egress). FSDP: 2 all-gathers + 1 reduce-scatter of the weights (1/Y each with tensor
    parallelism Y); DP: 1 all-reduce of the gradient shard; tensor: 4 activation collectives per layer
    per pass; sequence: K and V gathered per layer per pass; expert: 2 all-to-alls per layer per pass.
    The lower bound takes every rate at its peak; the estimate the calibrated MXU, ICI and DCN
    efficiencies (``mxu_eff``, ``link_eff``, ``dcn_eff``).
    Pipelined over p stages with m microbatches (MaxText's GPipe): a device holds L / p layers, gathers
    their weights once per microbatch, and sends each microbatch's activations forward and their
    gradient back: 2 m permutes, 2 (p - 1) of them on the critical path (the fill and the drain). The
    last stage also computes the unembedding and the loss, so the step is at least its m microbatches
    plus the fill and drain through the other stages' p - 1 (the Playbook's bubble, (p - 1) / m of a
    stage's compute, for balanced stages): lower bound and estimate alike.
    """
    from tpusim.compiler import model_flops_breakdown, model_flops_per_step

    m, chip = w.model, topo.chip
    p = mesh.size("pipeline", "dcn_pipeline")
    ab, L, tp = sh.act_bytes, m.num_layers // p, sh.tp
    c = chip.bf16_flops_per_s
    alpha = c / chip.ici_axis_bytes_per_s
    passes = 3 if w.step.remat_policy == "full" else 2  # forward, (recomputed forward,) backward

    def axes(*names: str) -> int:
        return sum(1 for a in mesh.axes_of(*names) if a != "dcn")

    def communication(ici_eff: float, dcn_rate_eff: float) -> tuple[float, float]:
        """(critical, overlapped) seconds with the ICI and DCN rates at these fractions of their peak."""
        def t(nbytes: float, n: int, *names: str, dcn: bool = False) -> float:
            if n <= 1:
                return 0.0
            bw = (topo.dcn_bytes_per_s_per_chip * dcn_rate_eff if dcn
                  else chip.ici_axis_bytes_per_s * ici_eff * max(axes(*names), 1))
            return nbytes * (n - 1) / n / bw if bw else float("inf")

        weights = m.params / tp * ab / p
        x_ici, x_dcn = mesh.size("fsdp", "sequence", "expert"), mesh.size("dcn_fsdp")
        k = w.step.gradient_accumulation_steps  # each microbatch gathers and reduce-scatters the weights again
        gathers = 3 * (microbatches if p > 1 else k)  # (pipelining and accumulation are exclusive)
        fsdp_s = t(gathers * weights, x_ici, "fsdp", "sequence", "expert") + t(gathers * weights / x_ici, x_dcn,
                                                                                 dcn=True)
        grads = weights / (x_ici * x_dcn) * (sh.weight_bytes / ab if k > 1 else 1)  # (the f32 accumulator)
        data_s = t(2 * grads, mesh.size("data"), "data") + t(2 * grads, mesh.size("dcn_data"), dcn=True)
        act = sh.tok * sh.d * ab
        tensor_s = t(4 * passes * L * act, tp, "tensor")
        kv = sh.seqs * sh.seq_len * sh.kv_heads * sh.head_dim * ab * 2
        sequence_s = t(passes * L * kv * sh.sp, sh.sp, "sequence")
        expert_s = t(2 * passes * L * act * sh.topk, sh.ep, "expert") if m.num_experts > 1 else 0.0
        critical, overlapped = tensor_s + sequence_s + expert_s, max(fsdp_s, data_s)
        if p > 1:  # each permute: one microbatch's activations (D / tensor) to the neighbouring stage
            permute = act / microbatches / tp
            one = (permute / (topo.dcn_bytes_per_s_per_chip * dcn_rate_eff) if mesh.size("dcn_pipeline") > 1
                   else permute / (chip.ici_axis_bytes_per_s * ici_eff / 2))
            critical += 2 * (p - 1) * one
            overlapped = max(overlapped, 2 * microbatches * one)
        return critical, overlapped

    compute_s = model_flops_per_step(w, sh.global_batch) / topo.num_chips / c
    if p > 1:
        parts = model_flops_breakdown(w, sh.global_batch)
        stage = (parts["layers"] + parts["attention"]) / topo.num_chips / c  # one stage's layers, per device
        last = stage + parts["unembedding"] * p / topo.num_chips / c  # ... and the head, on the last stage
        compute_s = last + (p - 1) / microbatches * stage  # the bubble: fill and drain
    critical, overlapped = communication(1.0, 1.0)
    critical_e, overlapped_e = communication(link_eff, dcn_eff)
    recompute = REMAT_RECOMPUTE.get(w.step.remat_policy, 1.0)
    tokens = sh.global_batch * sh.seq_len / topo.num_chips
    n_fsdp, n_tp = axes("fsdp", "sequence", "expert"), axes("tensor")
    return Roofline(compute_s=compute_s * recompute, critical_s=critical, overlapped_s=overlapped,
                    lower_s=max(compute_s + critical, overlapped),
                    estimate_s=max(compute_s * recompute / mxu_eff, overlapped_e) + critical_e,
                    tokens_per_chip=tokens, fsdp_axes=n_fsdp, tensor_axes=n_tp,
                    fsdp_limit_tokens=alpha / max(n_fsdp, 1) / tp,
                    tensor_ratio=tp * alpha / (max(n_tp, 1) * m.d_ff) if tp > 1 else 0.0)
