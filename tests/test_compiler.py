"""The Transformer compiler against the book: parameter and FLOP counts, per-layer communication
volumes per strategy, memory; and the program's structure (order, dependencies, prefetch windows)."""

from __future__ import annotations

import pytest

from tpusim.compiler import compile_program, model_flops_breakdown
from tpusim.errors import InfeasibleError, TpusimError
from tpusim.sim.program import COLLECTIVE, COMPUTE
from tpusim.sim.topology import parse_topology
from tpusim.model.workload import workload_from_dict

from conftest import fsdp_gradient_reductions, value, waited_at_once


def model(**dims):
    return {"base_emb_dim": dims["D"], "base_num_query_heads": dims["N"], "base_num_kv_heads": dims.get("K", dims["N"]),
            "head_dim": dims["H"], "base_mlp_dim": dims["F"], "base_num_decoder_layers": dims["L"],
            "vocab_size": dims["V"], "mlp_activations": dims.get("acts", ["silu", "linear"])}


def workload(m, **step_and_sharding):
    return workload_from_dict({"model": m, **step_and_sharding}, source="test.yaml")


# ---- parameter counts --------------------------------------------------------------------------

@pytest.mark.parametrize("case_id, dims, tol", [
    ("transformers-q1-param-count", dict(D=4096, N=32, H=128, F=16384, L=64, V=32000), 0.10),  # book rounds D, F
    ("training-q1-llama2-13b-params", dict(D=5120, N=40, H=128, F=13824, L=40, V=32000), 0.01),
    ("appl-train-llama3-70b-params", dict(D=8192, N=64, K=8, H=128, F=28672, L=80, V=128256), 0.005),
])
def test_parameter_counts(book_cases, case_id, dims, tol):
    case = book_cases[case_id]
    m = workload(model(**dims), per_device_batch_size=1).model
    # Exactly the book's formula (plus the RMSNorm scales, 2D per layer and D at the end).
    norms = 2 * dims["D"] * dims["L"] + dims["D"]
    key = "total" if "total" in case["recomputed"] else "params"
    recomputed = float(case["recomputed"][key]) if case_id != "transformers-q1-param-count" else \
        dims["L"] * (3 * dims["D"] * dims["F"] + 4 * dims["D"] ** 2) + 2 * dims["D"] * dims["V"]
    assert m.params - norms == pytest.approx(recomputed, rel=1e-6 if case_id != "appl-train-llama3-70b-params" else 1e-3)
    assert m.params == pytest.approx(value(case, "expected", key), rel=tol)  # the book's rounded answer


def test_llama3_70b_parts(book_cases):
    case = book_cases["appl-train-llama3-70b-params"]
    m = workload({"model_name": "llama3-70b"}, per_device_batch_size=1).model
    recomputed = case["recomputed"]
    assert m.num_layers * m.mlp_params_per_layer == recomputed["ffw"]
    assert m.num_layers * m.attention_params_per_layer == recomputed["attn"]
    assert m.embedding_params - m.d_model == recomputed["vocab"]
    assert m.params == pytest.approx(value(case, "expected", "total"), rel=0.003)  # "3 s.f."


def test_moe_params():
    w = workload({"model_name": "mixtral-8x7b"}, per_device_batch_size=1)
    # Mixtral 8x7B: 46.7B parameters, 12.9B active per token (Mistral AI's model card).
    assert w.model.params == pytest.approx(46.7e9, rel=0.002)
    assert w.model.active_params == pytest.approx(12.9e9, rel=0.002)


# ---- FLOPs ------------------------------------------------------------------------------------

def test_six_n_t(book_cases):
    """Book: training FLOPs = 6 x params x tokens (2 forward, 4 backward); LLaMA-3 70B: 4.2e11 per token."""
    case = book_cases["appl-train-flops-per-token"]
    w = workload({"model_name": "llama3-70b"}, per_device_batch_size=1, max_target_length=4096)
    parts = model_flops_breakdown(w, global_batch=1)
    per_token = (parts["layers"] + parts["unembedding"]) / 4096
    m = w.model
    matmul_params = m.params - m.vocab_size * m.d_model - m.norm_params_per_layer * m.num_layers - m.d_model
    assert per_token == pytest.approx(6 * matmul_params, rel=1e-12)
    assert per_token == pytest.approx(value(case, "expected", "flops_per_token"), rel=0.01)


@pytest.mark.parametrize("case_id, ratio_T", [("transformers-attention-fraction", 8), ("transformers-q5-attn-eq-qkvo", 2)])
def test_attention_flops_crossovers(book_cases, case_id, ratio_T):
    """Book: with F = 4D, D = N H, N = K, attention FLOPs equal all matmul FLOPs at T = 8D and the
    Q/K/V/O projections' at T = 2D (full, non-causal attention counted)."""
    d = 1024
    w = workload(model(D=d, N=8, H=128, F=4 * d, L=4, V=1000), per_device_batch_size=1,
                 max_target_length=ratio_T * d, attention_flops="full")
    parts = model_flops_breakdown(w, global_batch=1)
    if ratio_T == 8:
        assert parts["attention"] == pytest.approx(parts["layers"], rel=1e-12)
    else:
        qkvo = 6 * 4 * d * d * w.model.num_layers * ratio_T * d
        assert parts["attention"] == pytest.approx(qkvo, rel=1e-12)
    causal = workload(model(D=d, N=8, H=128, F=4 * d, L=4, V=1000), per_device_batch_size=1,
                      max_target_length=ratio_T * d)
    assert model_flops_breakdown(causal, 1)["attention"] == pytest.approx(parts["attention"] / 2)


@pytest.mark.parametrize("fused, matmuls", [(False, 7), (True, 5)])
def test_flash_backward_matmuls(fused, matmuls):
    """Splash attention's backward, as jax's kernel writes it and libtpu compiles it (fwd, dkv, dq
    kernels): MaxText's default (sa_use_fused_bwd_kernel: false) runs dkv (K Q^T, P^T dO, V dO^T,
    dS^T Q) and dq (Q K^T, dO V^T, dS K), 7 matmuls of the score block against the forward's 2 (Q K^T,
    P V); fused, 5. The second kernel also re-reads Q, K, V and dO and redoes the softmax's vector work."""
    m = model(D=2048, N=16, H=128, F=8192, L=2, V=32000)
    w = workload(m, per_device_batch_size=2, max_target_length=4096, remat_policy="none",
                 sa_use_fused_bwd_kernel=fused)
    prog = compile_program(w, parse_topology("v5p:2x2x1"))
    fwd = [o for o in prog.ops if o.category == "attention" and o.phase == "forward"]
    bwd = [o for o in prog.ops if o.category == "attention" and o.phase == "backward"]
    assert len(fwd) == len(bwd) == 2
    assert bwd[0].flops == pytest.approx(fwd[0].flops * matmuls / 2, rel=1e-12)
    assert bwd[0].vpu_flops == pytest.approx(fwd[0].vpu_flops * (13 if not fused else 7) / 6, rel=1e-12)
    assert any(o.name.endswith("attention_delta") for o in prog.ops)  # rowsum(O dO) before the kernels


def _blocks_with_a_score(t: int, bq: int, bkv: int, allowed) -> float:
    """Brute force: the share of the t x t grid in bq x bkv blocks where allowed(row, col) holds anywhere."""
    import numpy as np
    r, c = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    mask = allowed(r, c)
    area = sum(mask[i:i + bq, j:j + bkv].size for i in range(0, t, bq) for j in range(0, t, bkv)
               if mask[i:i + bq, j:j + bkv].any())
    return area / t**2


@pytest.mark.parametrize("t, bq, bkv, window, chunked", [
    (64, 8, 8, 0, False), (64, 16, 8, 0, False), (64, 8, 32, 0, False), (60, 16, 8, 0, False),
    (64, 8, 8, 24, False), (64, 16, 8, 20, False), (64, 8, 8, 32, True), (64, 8, 16, 24, True),
    (50, 16, 8, 16, True)])
def test_flash_fraction_is_the_blocks_a_splash_kernel_computes(t, bq, bkv, window, chunked):
    """jax's splash attention skips the blocks its mask leaves empty and computes the rest whole: the
    share of the grid tpusim charges equals a brute-force count over the element mask (causal; a
    sliding window of W keys, row - W < col <= row; chunks of W), for equal and unequal blocks and
    for a T the blocks do not divide. Equal blocks, causal: (n + 1) / 2n, not the convention's 1/2."""
    from tpusim.model.spec import Model
    m = Model(name="m", d_model=64, num_heads=1, num_kv_heads=1, head_dim=64, d_ff=64, num_layers=2,
              vocab_size=64, gated_mlp=True, sliding_window=window, local_period=2 if window else 0,
              chunked=chunked)
    if not window:
        allowed = (lambda r, c: c <= r)
    elif chunked:
        allowed = (lambda r, c: (c <= r) & (r // window == c // window))
    else:
        allowed = (lambda r, c: (c <= r) & (r - c < window))
    layer = 0  # local when there is a window (every 2nd layer is global)
    assert m.flash_fraction(layer, t, bq, bkv) == pytest.approx(_blocks_with_a_score(t, bq, bkv, allowed), rel=1e-12)
    if not window and bq == bkv and t % bq == 0:
        n = t // bq
        assert m.flash_fraction(layer, t, bq, bkv) == pytest.approx((n + 1) / (2 * n), rel=1e-12)


@pytest.mark.parametrize("key", ["sa_block_q", "sa_block_q_dkv", "sa_block_q_dq"])
def test_too_many_flash_blocks_is_one_clear_error(key):
    """Each kernel's computed blocks are counted query block by query block: a block size that splits the
    sequence into more than MAX_FLASH_BLOCKS is refused naming the key, not counted for minutes."""
    m = model(D=256, N=2, H=128, F=512, L=2, V=1000)
    with pytest.raises(TpusimError) as e:
        workload(m, per_device_batch_size=1, max_target_length=2**21, **{key: 1})
    assert e.value.key.endswith(key) and "query blocks" in e.value.reason
    with pytest.raises(TpusimError) as e:
        workload(m, per_device_batch_size=1, max_target_length=2048, **{key: 0})
    assert e.value.key.endswith(key)


def test_flash_kernels_each_use_their_own_blocks():
    """sa_block_q/kv set the forward kernel's blocks, sa_block_q_dkv/kv_dkv the dkv kernel's (4 of the
    backward's 7 matmuls, 7 vector ops a score) and sa_block_q_dq/kv_dq the dq kernel's (3, and 6)."""
    m = model(D=2048, N=16, H=128, F=8192, L=2, V=32000)
    t = 4096
    w = workload(m, per_device_batch_size=2, max_target_length=t, remat_policy="none", sa_block_q=1024,
                 sa_block_kv=1024, sa_block_q_dkv=512, sa_block_kv_dkv=512, sa_block_q_dq=256, sa_block_kv_dq=256)
    prog = compile_program(w, parse_topology("v5p:2x2x1"))
    fwd = next(o for o in prog.ops if o.category == "attention" and o.phase == "forward")
    bwd = next(o for o in prog.ops if o.category == "attention" and o.phase == "backward")
    f = {b: (t // b + 1) / (2 * (t // b)) for b in (1024, 512, 256)}  # causal, equal blocks
    grid = fwd.flops / f[1024]  # the forward's 2 matmuls over the whole T x T grid
    assert f[1024] == pytest.approx(5 / 8) and grid == 2 * (2 * t) * t * 16 * 2 * 128  # (pdbs 2, 4 chips, 16 heads)
    assert bwd.flops == pytest.approx(grid / 2 * (4 * f[512] + 3 * f[256]), rel=1e-12)
    assert bwd.vpu_flops == pytest.approx(fwd.vpu_flops / 6 / f[1024] * (7 * f[512] + 6 * f[256]), rel=1e-12)


@pytest.mark.parametrize("iota", [False, True])
def test_token_embedding(iota):
    """MaxText's Embed: with use_iota_embed, a one-hot matmul (tokens x V x D) against the gathered table
    and its transpose for the table's gradient, reduced over the weight axes; without (MaxText's
    default, jnp.take), no table gather: the lookup on this device's D-slice and an all-to-all of the
    tokens x D activations each way, as libtpu compiles it (traces/xla_aot_chips_maxtext), the
    gradient already sharded as the table."""
    m = model(D=2048, N=16, H=128, F=8192, L=2, V=32000)
    w = workload(m, per_device_batch_size=2, max_target_length=2048, use_iota_embed=iota)
    prog = compile_program(w, parse_topology("v5p:2x2x2"))
    names = {o.name: o for o in prog.ops}
    tok = 2 * 2048
    if iota:
        assert names["embedding/fwd/one_hot"].flops == 2 * tok * 32000 * 2048
        assert names["embedding/bwd/one_hot_wgrad"].flops == 2 * tok * 32000 * 2048
        assert "all-gather/embedding" in names and "reduce-scatter/embedding" in names
        assert not any(n.startswith("all-to-all/embedding") for n in names)
    else:
        assert names["all-to-all/embedding"].bytes == names["all-to-all/embedding_grad"].bytes == tok * 2048 * 2
        assert "all-gather/embedding" not in names and "reduce-scatter/embedding" not in names
        assert not any(n.startswith("embedding/fwd/one_hot") for n in names)


def test_executed_flops_follow_remat():
    """Executed FLOPs: 6 N T without remat; full remat adds a forward (book: ~8 N T)."""
    base = dict(per_device_batch_size=4, max_target_length=2048, attention="dot_product", attention_flops="full")
    m = model(D=2048, N=16, H=128, F=8192, L=8, V=32000)
    topo = parse_topology("v5p:2x2x1")
    none = compile_program(workload(m, **base, remat_policy="none"), topo)
    full = compile_program(workload(m, **base, remat_policy="full"), topo)
    matmul_none = sum(o.flops for o in none.ops if o.category in ("matmul", "attention"))
    assert matmul_none * none.devices == pytest.approx(none.model_flops_per_step, rel=1e-9)
    # Remat recomputes the layer's forward except what only feeds the layer's output (XLA removes the
    # down-projection and the last residual add as dead code).
    recomputed = sum(o.flops for o in full.ops if o.recompute)
    # (dense attention's softmax is not recomputed on its own: XLA fuses it into the softmax backward)
    forward_needed = sum(o.flops for o in none.ops if o.phase == "forward" and o.layer >= 0
                         and not o.name.endswith(("mlp_down", "mlp_residual", "softmax")))
    assert recomputed == pytest.approx(forward_needed, rel=1e-12)
    ratio = sum(o.flops for o in full.ops if o.category in ("matmul", "attention")) / matmul_none
    assert 1.2 < ratio < 8 / 6  # below the book's "8 N T": no down-projection or unembedding redone


# ---- per-layer communication volume (book training.md table) ----------------------------------

def _mlp_volume(prog, phase):
    """Collective bytes of layer 0's MLP block, as the book counts them: an all-reduce costs 2 V."""
    total = 0.0
    for op in prog.ops:
        if op.stream == COLLECTIVE and op.layer == 0 and op.phase == phase and "mlp" in op.name:
            total += op.bytes * (2 if op.category == "all-reduce" else 1)
    return total


@pytest.mark.parametrize("strategy, ici, remat", [
    ("DP", {"data": 16, "fsdp": 1}, "none"),
    ("FSDP", {"fsdp": 16}, "none"),
    ("TP", {"tensor": 16, "fsdp": 1}, "none"),
    ("FSDP+TP", {"fsdp": 4, "tensor": 4}, "none"),
])
def test_per_layer_volume_table(book_cases, strategy, ici, remat):
    """Book: per layer (an ungated MLP, bf16), forward + backward volumes: DP 0 + 8DF; FSDP 4DF + 8DF;
    TP 4BD + 4BD; FSDP+TP (4BD/X + 4DF/Y) + (8BD/X + 8DF/Y). B is the global token batch.

    The book's FSDP+TP backward activation term, 8BD/X, disagrees with its own TP row (4BD backward);
    we reproduce the TP row's 4BD/X. With block remat the backward also redoes the forward's
    all-gather into the MLP (2BD/X more, 6BD/X in all); the reduce-scatter after it is dead code."""
    assert strategy in book_cases["training-per-layer-volume-table"]["expected"]
    d, f = 1024, 4096
    m = model(D=d, N=16, H=64, F=f, L=2, V=1024, acts=["gelu"])
    sharding = {f"ici_{k}_parallelism": v for k, v in ici.items()}
    w = workload(m, per_device_batch_size=2, max_target_length=512, remat_policy=remat, weight_dtype="bfloat16",
                 **sharding)
    prog = compile_program(w, parse_topology("v5e:4x4"))
    B = prog.tokens_per_step
    X = ici.get("data", 1) * ici.get("fsdp", 1)
    Y = ici.get("tensor", 1)
    expected = {
        "DP": (0, 8 * d * f),
        "FSDP": (4 * d * f, 8 * d * f),
        "TP": (4 * B * d, 4 * B * d),
        "FSDP+TP": (4 * B * d / X + 4 * d * f / Y, 4 * B * d / X + 8 * d * f / Y),
    }[strategy]
    assert _mlp_volume(prog, "forward") == pytest.approx(expected[0], rel=1e-12)
    assert _mlp_volume(prog, "backward") == pytest.approx(expected[1], rel=1e-12)
    if strategy == "FSDP+TP":
        remat = compile_program(workload(m, per_device_batch_size=2, max_target_length=512, remat_policy="full",
                                         weight_dtype="bfloat16", **sharding), parse_topology("v5e:4x4"))
        assert _mlp_volume(remat, "backward") == pytest.approx(6 * B * d / X + 8 * d * f / Y, rel=1e-12)


# ---- memory ------------------------------------------------------------------------------------

def test_adam_memory(book_cases):
    """Book: bf16 params and f32 Adam moments: 10 bytes per parameter (LLaMA-2 13B: 130 GB)."""
    case = book_cases["training-q2-llama2-13b-memory"]
    w = workload({"model_name": "llama2-13b"}, per_device_batch_size=1, max_target_length=512,
                 weight_dtype="bfloat16", mu_dtype="float32")
    prog = compile_program(w, parse_topology("v5p:4x4x4"), check_memory=False)
    per_device = prog.memory.params + prog.memory.optimizer
    assert per_device * 64 == pytest.approx(10 * w.model.params, rel=1e-9)
    assert per_device * 64 == pytest.approx(value(case, "expected", "param_opt_bytes"), rel=0.01)


def test_activation_memory_with_and_without_remat(book_cases):
    """Book: block remat keeps 2 B T D L bytes; no remat keeps 'about 20' B T D tensors per layer."""
    case = book_cases["transformers-activation-memory-remat"]
    d, L = 8192, 64
    m = model(D=d, N=64, H=128, F=4 * d, L=L, V=32000)
    full = compile_program(workload(m, per_device_batch_size=8, max_target_length=4096, remat_policy="full"),
                           parse_topology("v5p:2x2x1"), check_memory=False)
    tokens = 8 * 4096
    assert full.memory.activations == pytest.approx(2 * tokens * d * L, rel=1e-12)
    scale = value(case, "inputs", "tokens") / tokens
    assert full.memory.activations * scale == pytest.approx(value(case, "expected", "block_remat"), rel=0.01)
    none = compile_program(workload(m, per_device_batch_size=8, max_target_length=4096, remat_policy="none",
                                    weight_dtype="bfloat16"), parse_topology("v5p:2x2x1"), check_memory=False)
    # The book counts "about 20" BTD tensors per layer. JAX's autodiff keeps more, and XLA allocates them
    # all (traces/xla_aot_memory/v5e_1b_none: within 0.1%): per token 26 D bytes (the norms' float32
    # inputs, normalised and scaled outputs; Q, K, V; the kernel output and the context) and 12 F bytes
    # (gate, up, SiLU's three intermediates, the product), plus 4 bytes per head (log-sum-exp):
    # 13 + 6 F / D = 37 tensors for F = 4 D, above the book's rough count.
    tensors = none.memory.activations / (2 * tokens * d * L)
    assert tensors == pytest.approx(13 + 6 * 4 + 2 * 64 / d, rel=1e-12)
    assert tensors > value(case, "inputs", "saved_per_layer")


def test_out_of_memory_is_refused_with_the_breakdown():
    w = workload({"model_name": "llama3-70b"}, per_device_batch_size=4, max_target_length=8192)
    with pytest.raises(InfeasibleError, match=r"does not fit in HBM: needs .* \(params .*activations"):
        compile_program(w, parse_topology("v5e:4x4"))


def test_shipped_measured_configs_fit():
    """The end-to-end measured configurations ran on real chips, so they must fit by our estimate."""
    from tpusim.api import compile_workload
    from conftest import REPO

    misses = {}
    for p in sorted((REPO / "workloads" / "measured").glob("*.yaml")):
        if p.name == "measured.yaml":  # the measurements, not a workload
            continue
        try:
            compile_workload(p)
        except InfeasibleError as e:
            misses[p.stem] = e.reason
    assert not misses, misses


# ---- structure -----------------------------------------------------------------------------------

def test_program_structure_and_prefetch_windows():
    w = workload({"model_name": "llama3-8b"}, per_device_batch_size=1, max_target_length=2048,
                 ici_tensor_parallelism=4, collective_matmul=False)
    prog = compile_program(w, parse_topology("v5p:4x4x4"))
    ops = prog.ops
    assert all(op.index == i for i, op in enumerate(ops))
    assert all(d < op.index for op in ops for d in op.deps)  # dependencies point backwards
    waited = {d for op in ops if op.stream == COMPUTE for d in op.deps}
    assert all(op.index in waited for op in ops if op.stream == COLLECTIVE)  # every collective is waited for
    first_op = {}
    for op in ops:
        if op.stream == COMPUTE and op.phase == "forward" and op.layer >= 0:
            first_op.setdefault(op.layer, op.index)
    for op in ops:  # FSDP prefetch: layer l+1's weights are gathered as layer l starts
        if op.stream == COLLECTIVE and "/forward/" in op.name:  # the weight gathers
            if op.layer >= 1:
                assert op.deps == (first_op[op.layer - 1],)
    # Gradient reduce-scatters are waited for only by the optimizer.
    opt = ops[-1]
    assert opt.category == "optimizer"
    rs = [op.index for op in ops if op.category == "reduce-scatter" and op.mesh_axes == ("fsdp",)]
    assert rs and set(rs) <= set(opt.deps)
    # Tensor-parallel collectives are on the critical path: the very next compute op waits for them (without
    # collective matmuls: tests/test_collective_matmul.py).
    for op in ops:
        if op.stream == COLLECTIVE and op.mesh_axes == ("tensor",):
            assert waited_at_once(ops, op)


@pytest.mark.parametrize("remat, deferred", [("minimal", True), ("full", False)])
def test_recompute_regathers_only_for_weight_gradients_are_asynchronous(remat, deferred):
    """Under a remat policy that keeps the projections' outputs, the backward's recompute gathers a block's
    normed input over tensor again only for the weight gradients: libtpu (MaxText v5p 32B's compile, its
    flags) issues that re-gather asynchronously, waited for by the first weight-gradient matmul that reads
    it. When the recompute runs the projections itself (full remat), they wait for it at once."""
    w = workload({"model_name": "llama3-8b", "base_num_decoder_layers": 2}, per_device_batch_size=1,
                 max_target_length=1024, remat_policy=remat,
                 sharding={"ici_tensor_parallelism": 4, "ici_fsdp_parallelism": -1})
    ops = compile_program(w, parse_topology("v5p:2x2x4"), check_memory=False).ops
    for block, first_wgrad in (("attn_in", "q_proj"), ("mlp_in", "mlp_gate")):
        gather = next(op for op in ops if op.name == f"all-gather/layer_1/recompute/{block}")
        wgrad = next(o for o in ops if o.name == f"layer_1/bwd/{first_wgrad}/wgrad")
        assert waited_at_once(ops, gather) != deferred
        assert (gather.index in wgrad.deps) == deferred


@pytest.mark.parametrize("spec, fsdp, tensor, reduction, whole", [
    ("v5e:4x8", 32, 1, "xla", False), ("v5e:8x8", 64, 1, "xla", True), ("v5e:16x16", 64, 1, "xla", True),
    ("v5e:8x8", 32, 1, "xla", False), ("v5e:16x16", 64, 4, "xla", False), ("v5e:8x8", 64, 1, "reduce_scatter", False)])
def test_fsdp_gradients_over_64_devices_or_more_are_all_reduced_whole_and_synchronously(spec, fsdp, tensor,
                                                                                         reduction, whole):
    """As libtpu compiles it (traces/aot_grad_reduction.py): a weight gradient reduced over 64 or more
    devices, with the data axis the whole slice, is all-reduced whole, synchronously (the next op waits for
    it), the slice kept; over fewer, beside a tensor axis, or with ``gradient_reduction: reduce_scatter``,
    it is reduce-scattered and only the optimizer waits."""
    topo = parse_topology(spec)
    w = workload({"model_name": "llama2-7b", "base_num_decoder_layers": 2}, per_device_batch_size=1,
                 max_target_length=1024, gradient_reduction=reduction,
                 sharding={"ici_fsdp_parallelism": fsdp, "ici_tensor_parallelism": tensor,
                           "ici_data_parallelism": -1})
    ops = compile_program(w, topo, check_memory=False).ops
    grads = fsdp_gradient_reductions(ops)
    assert len(grads) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the unembedding
    assert {op.category for op, _ in grads} == {"all-reduce" if whole else "reduce-scatter"}
    for op, wg in grads:
        assert op.bytes == pytest.approx(wg.flops / wg.mxu_shape[1])  # the whole K x N gradient in bf16 (/ tensor)
        assert waited_at_once(ops, op) == whole


@pytest.mark.parametrize("sharding, words", [
    ({"ici_tensor_parallelism": 3}, "does not divide"),
    ({"ici_tensor_parallelism": 64, "ici_fsdp_parallelism": 1}, "query heads 32 is not divisible by 64"),
    ({"ici_sequence_parallelism": 64, "ici_fsdp_parallelism": 1}, "sequence length 2000 is not divisible"),
])
def test_uneven_splits(sharding, words):
    w = workload({"model_name": "llama3-8b"}, per_device_batch_size=1, max_target_length=2000, **sharding)
    with pytest.raises(TpusimError, match=words):
        compile_program(w, parse_topology("v5p:4x4x4"))


def test_batch_must_split():
    w = workload({"model_name": "llama3-8b"}, per_device_batch_size=0.5, max_target_length=2048)
    with pytest.raises(TpusimError, match="does not split evenly"):
        compile_program(w, parse_topology("v5p:4x4x4"))


def test_gradient_reduction_bad_choice_is_one_error():
    with pytest.raises(TpusimError) as e:
        workload({"model_name": "llama2-7b"}, per_device_batch_size=1, gradient_reduction="all_reduce")
    assert e.value.key == "gradient_reduction" and e.value.reason == "'all_reduce' is not one of xla, reduce_scatter"
