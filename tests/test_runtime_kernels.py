"""Decode fast paths == their plain versions: the sync-free dense MoE == the sparse one, the packed
pre-attention (fused q|k|v matmul, in-place RoPE) == pre_attention, and the GQA decode-attention
kernels (grouped SDPA, batched matmuls; precomputed mask) == naive attention."""

import pytest

torch = pytest.importorskip("torch")

import runtime.cpu_attention as cpu_attention  # noqa: E402
from hrm.spec import ModelSpec  # noqa: E402
from runtime import model, moe  # noqa: E402
from runtime.synthetic import synthesize  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402
from oracles import naive_decode_attention

torch.set_num_threads(1)

MIXTRAL3 = ModelSpec(name="tiny-mixtral3", model_type="mixtral", hidden_size=20, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=3, head_dim=8, vocab_size=50, num_experts=3,
                     num_experts_per_tok=2, moe_intermediate_size=12)
QWEN2 = ModelSpec(name="tiny-qwen2", model_type="qwen2_moe", hidden_size=24, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=4, vocab_size=50, num_experts=5,
                  num_experts_per_tok=3, moe_intermediate_size=10, shared_expert_intermediate_size=14,
                  shared_expert_gate=True, qkv_bias=True, norm_topk_prob=False)


def _store(spec, resident, dtype=torch.float64, buffer=1, layer=1, device="cpu"):
    store = WeightStore(spec, dtype, device, num_resident=resident, num_pages=2)
    synthesize(store, seed=7, progress=False)
    for page in store.page_table.pages:
        store.copy_page(layer, buffer, page)
    return store


@pytest.mark.parametrize("spec, resident", [(MIXTRAL3, 0), (MIXTRAL3, 1), (MIXTRAL3, 3), (QWEN2, 2)],
                         ids=["mixtral3-streamed", "mixtral3-split", "mixtral3-resident", "qwen2-split"])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_dense_moe_equals_sparse(spec, resident, tokens):
    store = _store(spec, resident)
    table = store.lookup(1, 1)
    assert table.groups and sum(g.shape[0] for _, g in table.groups) == spec.num_experts
    layer = store.dense.layers[1]
    g = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, spec.hidden_size, generator=g, dtype=torch.float64)
    assert tokens <= moe.MOE_DENSE_MAX_TOKENS
    dense = moe.moe(h, layer, table, spec)                      # ExpertTable: dense path
    sparse = moe.moe(h, layer, lambda e: table(e), spec)        # plain lookup: sparse path
    reference = moe.moe(h, layer, store.at_rest(1), spec)
    assert torch.equal(sparse, reference)
    assert float((dense - sparse).abs().max()) <= 1e-12 * float(sparse.abs().max())


def test_dense_moe_bf16_matches_sparse_closely():
    store = _store(MIXTRAL3, 1, dtype=torch.bfloat16)
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    h = torch.randn(7, MIXTRAL3.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dense, sparse = moe.moe(h, layer, table, MIXTRAL3), moe.moe(h, layer, lambda e: table(e), MIXTRAL3)
    assert float((dense.float() - sparse.float()).abs().max()) <= 1e-2 * float(sparse.float().abs().max())


def test_moe_takes_the_sparse_path_above_the_threshold(monkeypatch):
    store = _store(MIXTRAL3, 1)              # fp64: no grouped GEMM, so the sparse path
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    h = torch.randn(9, MIXTRAL3.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    used = []
    for name in ("_routed_dense", "_routed_sparse"):
        fn = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, fn=fn, name=name: used.append(name) or fn(*a))
    monkeypatch.setattr(moe, "MOE_DENSE_MAX_TOKENS", 8)
    moe.moe(h, layer, table, MIXTRAL3)
    moe.moe(h[:8], layer, table, MIXTRAL3)
    assert used == ["_routed_sparse", "_routed_dense"]


ALIGNED = ModelSpec(name="tiny-aligned", model_type="qwen2_moe", hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50, num_experts=5,
                    num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=16,
                    shared_expert_gate=True, qkv_bias=True, norm_topk_prob=False)


@pytest.mark.parametrize("spec, resident", [(ALIGNED, 0), (ALIGNED, 2), (ALIGNED, 5)],
                         ids=["streamed", "split", "resident"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_moe_equals_sparse(spec, resident, dtype):
    if not moe.grouped_mm_available(torch.device("cpu"), dtype):
        pytest.skip("this torch has no CPU grouped GEMM")
    store = _store(spec, resident, dtype=dtype)
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    tokens = moe.MOE_DENSE_MAX_TOKENS + 37
    h = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)
    weights, ids = moe.route(h, layer.router, spec)
    grouped = moe._routed_grouped(h, weights, ids, table.matrices(spec), spec)
    sparse = moe._routed_sparse(h, weights, ids, table, spec)
    assert torch.isfinite(grouped).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((grouped - sparse).abs().max()) <= tol * float(sparse.abs().max())


def _routing(case: str, tokens: int, spec: ModelSpec):
    """(weights, ids) [tokens, k] for odd routings: `skewed`: the last expert gets no token and the one
    before it exactly one; `all-same`: every token on experts 0 .. k-1; `one-token`: a single token."""
    k, e = spec.num_experts_per_tok, spec.num_experts
    g = torch.Generator().manual_seed(11)
    if case == "all-same":
        ids = torch.arange(k).repeat(tokens, 1)
    else:
        ids = torch.stack([torch.randperm(e - 2, generator=g)[:k] for _ in range(tokens)])
        ids[tokens // 2, 0] = e - 2
    w = torch.rand(tokens, k, generator=g, dtype=torch.float32)
    return w / w.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("case, tokens", [("skewed", 53), ("all-same", 53), ("one-token", 1), ("skewed", 16)])
@pytest.mark.parametrize("resident", [0, 3, 5], ids=["streamed", "split", "resident"])
@pytest.mark.parametrize("host_sync_ok", [False, True], ids=["sync-free", "exact"])
def test_grouped_moe_equals_the_oracle_on_odd_routings(monkeypatch, case, tokens, resident, host_sync_ok):
    """Experts with no token, one token, all tokens (a store with no pair at all under `all-same` and
    3 resident); slices of 16 tokens (53 = 3 full slices + 5); both the sync-free and the exact split."""
    if not moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no CPU grouped GEMM")
    monkeypatch.setattr(moe, "moe_grouped_slice_tokens", lambda spec: 16)
    store = _store(ALIGNED, resident, dtype=torch.float32)
    table = store.lookup(1, 1)
    h = torch.randn(tokens, ALIGNED.hidden_size, generator=torch.Generator().manual_seed(3))
    weights, ids = _routing(case, tokens, ALIGNED)
    grouped = moe._routed_grouped(h, weights, ids, table.matrices(ALIGNED), ALIGNED, host_sync_ok)
    oracle = moe._routed_sparse(h, weights, ids, table, ALIGNED)
    assert float((grouped - oracle).abs().max()) <= 1e-5 * float(oracle.abs().max())


def test_moe_takes_the_grouped_path_above_the_threshold(monkeypatch):
    if not moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no CPU grouped GEMM")
    used = []
    for name in ("_routed_dense", "_routed_grouped", "_routed_sparse"):
        fn = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, fn=fn, name=name: used.append(name) or fn(*a))
    monkeypatch.setattr(moe, "MOE_DENSE_MAX_TOKENS", 8)
    for spec in (ALIGNED, QWEN2):            # QWEN2: 10-float (40-byte) expert rows, not 16-byte multiples
        store = _store(spec, 1, dtype=torch.float32)
        table, layer = store.lookup(1, 1), store.dense.layers[1]
        h = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(1))
        moe.moe(h, layer, table, spec)
        moe.moe(h, layer, lambda e: table(e), spec)
    assert used == ["_routed_grouped", "_routed_sparse", "_routed_sparse", "_routed_sparse"]


@pytest.mark.parametrize("spec", [MIXTRAL3, QWEN2], ids=["mixtral", "qwen2-bias"])
def test_packed_pre_attention_equals_pre_attention(spec):
    store = _store(spec, 0)
    layer = store.dense.layers[1]
    fused = model.fused_qkv(layer.attn)
    assert fused is not None and fused[0].shape == (spec.q_dim + 2 * spec.num_key_value_heads * spec.head_dim,
                                                    spec.hidden_size)
    assert (fused[1] is not None) == spec.qkv_bias
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cos, sin = model.rope_cos_sin(torch.tensor([3, 0, 17, 250, 9]), spec, torch.float64)
    q, k, v = model.pre_attention(x, layer, spec, cos, sin)
    expected = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)
    for qkv in (fused, None):
        out = torch.empty_like(expected)
        model.pre_attention_packed(x, layer, spec, cos, sin, model.signed_sin(sin), out, qkv)
        assert float((out - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_in_place_rope_is_bit_identical():
    spec = MIXTRAL3
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 4, spec.head_dim, generator=g).to(dtype)
        cos, sin = model.rope_cos_sin(torch.arange(6) * 37, spec, dtype)
        assert torch.equal(model.apply_rope_(x.clone(), cos, model.signed_sin(sin)), model.apply_rope(x, cos, sin))


def test_fused_qkv_refuses_separate_tensors():
    a = model.AttentionWeights(torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 4))
    assert model.fused_qkv(a) is None


# ---- decode attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["sdpa", "bmm"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_kernels_match_naive(monkeypatch, kernel, dtype, tol):
    monkeypatch.setattr(cpu_attention, "DECODE_KERNEL", kernel)
    g = torch.Generator().manual_seed(0)
    b, n_kv, groups, ctx, d = 6, 3, 2, 33, 16
    q = torch.randn(b, n_kv * groups, d, generator=g).to(dtype)
    k = torch.randn(b, n_kv, ctx + 7, d, generator=g).to(dtype)
    v = torch.randn(b, n_kv, ctx + 7, d, generator=g).to(dtype)
    starts = torch.tensor([0, 3, 0, 10, 32, 5])
    ends = torch.tensor([33, 33, 1, 20, 33, 6])
    ref = naive_decode_attention(q, k, v, starts, ends)
    mask = cpu_attention.attention_mask(starts, ends, ctx + 4)         # longer than needed: cut to num_slots
    for out in (cpu_attention.decode_attention(q, k, v, starts, ends),
                cpu_attention.decode_attention(q, k, v, starts, ends, ctx),
                cpu_attention.decode_attention(q, k, v, None, None, ctx, mask=mask)):
        assert out.dtype == dtype and out.shape == (b, n_kv * groups * d)
        assert float((out.double() - ref).abs().max()) < tol


def _moe_with_sync_as_error(h, layer, table, spec):
    """moe.moe with CUDA's sync debug mode set to raise on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return moe.moe(h, layer, table, spec)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_dense_moe_does_not_synchronise():
    store = _store(MIXTRAL3, 1, dtype=torch.float32, device="cuda")
    h = torch.randn(7, MIXTRAL3.hidden_size, device="cuda")
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    dense = _moe_with_sync_as_error(h, layer, table, MIXTRAL3)
    sparse = moe.moe(h, layer, lambda e: table(e), MIXTRAL3)
    assert float((dense - sparse).abs().max()) <= 1e-5 * float(sparse.abs().max())


@pytest.mark.gpu
def test_gpu_grouped_moe_does_not_synchronise_and_equals_sparse():
    """Decode micro-batches above MOE_DENSE_MAX_TOKENS take the grouped path on sm90+ (bf16)."""
    if not moe.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no CUDA grouped GEMM for bf16 on this GPU")
    store = _store(ALIGNED, 2, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(moe.MOE_DENSE_MAX_TOKENS + 11, ALIGNED.hidden_size, device="cuda").to(torch.bfloat16)
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    grouped = _moe_with_sync_as_error(h, layer, table, ALIGNED)
    sparse = moe.moe(h, layer, lambda e: table(e), ALIGNED)
    assert float((grouped.float() - sparse.float()).abs().max()) <= 2e-2 * float(sparse.float().abs().max())


QUANT = ModelSpec(name="tiny-quant", model_type="mixtral", hidden_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=50, num_experts=6,
                  num_experts_per_tok=2, moe_intermediate_size=256)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [7, moe.MOE_DENSE_MAX_TOKENS + 11], ids=["dense", "grouped"])
def test_gpu_quantized_moe_does_not_synchronise_and_equals_the_dequantized_experts(fmt, tokens):
    """Experts stored int8 / int4 on the GPU (2 of 6 resident, the rest in a streamed buffer): dequantized
    into the workspace and run without a host sync; the same as the sparse path over the experts
    dequantized one by one (store.at_rest)."""
    spec = QUANT.with_expert_format(fmt)
    store = _store(spec, 2, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(tokens, spec.hidden_size, device="cuda").to(torch.bfloat16)
    table, layer = store.lookup(1, 1), store.dense.layers[1]
    got = _moe_with_sync_as_error(h, layer, table, spec)
    want = moe.moe(h, layer, store.at_rest(1), spec)
    assert float((got.float() - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())


@pytest.mark.gpu
def test_gpu_rms_norm_equals_the_explicit_fp32_formula():
    """model.rms_norm lets F.rms_norm cast bf16 up internally; it must round like the HF formula."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(22, 4096, device="cuda", generator=g) * 3).to(torch.bfloat16)
    w = torch.randn(4096, device="cuda", generator=g).to(torch.bfloat16)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    got = model.rms_norm(x, w, 1e-5)
    assert float((got.float() - expected.float()).abs().max()) <= 1e-2 * float(expected.float().abs().max())
    assert (got != expected).float().mean() < 0.01     # at most a few last-bit differences (mean order)


@pytest.mark.parametrize("pad", [0, 3])
def test_batched_causal_attention_equals_per_sequence(pad):
    from runtime.model import causal_attention
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 11, 6, 8, generator=g, dtype=torch.float64)      # [B, S, n_q, d]
    k = torch.randn(4, 11, 3, 8, generator=g, dtype=torch.float64)      # [B, S, n_kv, d]
    v = torch.randn(4, 11, 3, 8, generator=g, dtype=torch.float64)
    batched = causal_attention(q, k, v, pad)                             # [B, S, n_q * d]
    for b in range(4):
        torch.testing.assert_close(batched[b], causal_attention(q[b], k[b], v[b], pad), rtol=1e-12, atol=1e-12)


def test_prefill_splits_the_stores_exactly_and_decode_stays_sync_free(monkeypatch):
    """Experts both resident and streamed: prefill (never in a CUDA graph) takes the grouped path's exact
    split, one host sync per slice; decode (captured in graphs on a GPU) the sync-free one; the tokens are
    those of the sync-free path throughout."""
    if not moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no CPU grouped GEMM")
    from hrm.policy import Policy
    from runtime.engine import Engine

    monkeypatch.setattr(moe, "MOE_DENSE_MAX_TOKENS", 2)
    prompts = [[(7 * i + j) % ALIGNED.vocab_size for j in range(5)] for i in range(6)]
    policy = Policy(6, 6, weights_gpu_frac=0.4)                 # 2 of 5 experts resident: two stores
    used = []
    grouped_slice = moe._grouped_slice
    monkeypatch.setattr(moe, "_grouped_slice",
                        lambda *a: used.append("exact" if a[-1] else "sync-free") or grouped_slice(*a))
    with Engine(ALIGNED, policy, dtype=torch.float32, seed=0, progress=False) as eng:
        eng.generate(prompts, 1)                                # prefill only
        assert set(used) == {"exact"}
        used.clear()
        tokens, _ = eng.generate(prompts, 3)
        assert "sync-free" in used and "exact" in used
        monkeypatch.setattr(moe, "_grouped_slice", lambda *a: grouped_slice(*a[:-1], False))
        assert eng.generate(prompts, 3)[0] == tokens
