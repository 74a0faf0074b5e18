"""The 8-bit KV cache and the CPU decode-attention kernels: every kernel equals SDPA on odd shapes, the
quantized kernels equal SDPA over the dequantized cache and stay within a stated distance of the unquantized
one, quantization round-trips, the cache's bytes are the memory account's (scales included), and the whole
pipeline on the CPU with an int8 cache gives the tokens of the same pipeline over a cache holding the
dequantized values; int8 against bf16 on a tiny real-format checkpoint, reported."""
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import runtime.cpu_attention as ca  # noqa: E402
from hrm.formats import KV_FORMATS, kv_format  # noqa: E402
from hrm.memory import MemoryProfile, PassShape, account  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import ModelSpec  # noqa: E402
from runtime.engine import Engine, UnsupportedPolicy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

torch.set_num_threads(1)

TINY = ModelSpec(name="tiny-kv", model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=97, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=32, qk_norm=True, norm_topk_prob=True)

# (batch, kv heads, group, slots read, cache capacity, d): odd batches across and within chunks, GQA 1/4/8
SHAPES = [(7, 3, 1, 33, 40, 16), (17, 2, 4, 5, 9, 8), (ca.ATTENTION_CHUNK_SEQUENCES + 3, 1, 8, 19, 19, 32)]


def _case(batch, n_kv, group, t, cap, d, dtype, seed=0):
    """q, k, v (cache of `cap` slots), mask with empty, full, one-slot and inner ranges."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv * group, d, generator=g).to(dtype)
    k = torch.randn(batch, n_kv, cap, d, generator=g).to(dtype)
    v = torch.randn(batch, n_kv, cap, d, generator=g).to(dtype)
    starts = torch.randint(0, t, (batch,), generator=g)
    ends = torch.minimum(starts + torch.randint(1, t + 1, (batch,), generator=g), torch.tensor(t))
    starts[0], ends[0] = 0, t                # full
    starts[1], ends[1] = 3, 3                # empty: zeros, as SDPA gives
    starts[2], ends[2] = t - 1, t            # the last slot only
    return q, k, v, ca.attention_mask(starts, ends, t)


def _sdpa(q, k, v, mask):
    """torch SDPA in float64 over the grouped view (the reference), k, v already cut to the mask's slots."""
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.double().view(b, n_kv, n_q // n_kv, d), k.double(), v.double(),
                                         attn_mask=mask)
    return out.reshape(b, n_q * d)


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", list(ca.KERNELS))
def test_kernels_equal_sdpa_on_odd_shapes(monkeypatch, kernel, dtype, shape):
    monkeypatch.setattr(ca, "DECODE_KERNEL", kernel)
    q, k, v, mask = _case(*shape, dtype)
    t = mask.shape[-1]
    ref = _sdpa(q, k[:, :, :t], v[:, :, :t], mask)
    out = ca.decode_attention(q, k, v, None, None, t, mask=mask)
    assert out.dtype == dtype and out.shape == ref.shape
    assert float((out.double() - ref).abs().max()) < TOL[dtype]
    assert float(out[1].abs().max()) == 0.0                       # the empty range


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kernel", list(ca.QUANT_KERNELS))
def test_quantized_kernels_equal_sdpa_over_the_dequantized_cache(monkeypatch, kernel, fmt, shape):
    """Within the compute dtype's tolerance of SDPA over the values the cache holds (fp32 q: exact but for
    fp32 rounding; chunked_bf16 rounds its scores to bf16, so it is held to bf16's tolerance)."""
    monkeypatch.setattr(ca, "QUANT_DECODE_KERNEL", kernel)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, mask = _case(*shape, dtype, seed=1)
        t = mask.shape[-1]
        kq, vq = (ca.quantize_kv(x, kv_format(fmt)) for x in (k, v))
        ref = _sdpa(q, kq.dequantize(torch.float64)[:, :, :t], vq.dequantize(torch.float64)[:, :, :t], mask)
        out = ca.decode_attention(q, kq, vq, None, None, t, mask=mask)
        tol = TOL[torch.bfloat16] if kernel == "chunked_bf16" else TOL[dtype]
        assert out.dtype == dtype
        assert float((out.double() - ref).abs().max()) < tol, dtype
        assert float(out[1].abs().max()) == 0.0


KV_TOL = {"int8": 1e-2, "fp8": 5e-2}
"""Stated distance of attention over an 8-bit cache from attention over the unquantized one, in units of
max |V| (unit-normal K and V; measured: int8 about 0.3%, fp8 about 2%)."""


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_8bit_attention_within_a_stated_tolerance_of_bf16(fmt):
    for shape in SHAPES:
        q, k, v, mask = _case(*shape, torch.bfloat16, seed=2)
        t = mask.shape[-1]
        ref = _sdpa(q, k[:, :, :t], v[:, :, :t], mask)
        out = ca.decode_attention(q, *(ca.quantize_kv(x, kv_format(fmt)) for x in (k, v)), None, None, t, mask=mask)
        err = float((out.double() - ref).abs().max()) / float(v.double().abs().max())
        assert err < KV_TOL[fmt], (shape, err)


def test_quantization_round_trips():
    """int8: every value within half a step of its vector's scale, a grid value kept exactly, an all-zero
    vector stored as zeros with scale 1; fp8 within e4m3's relative step (2^-3 of the value, or of the
    scale near zero)."""
    x = torch.randn(5, 3, 7, 16, dtype=torch.float64) * torch.logspace(-3, 3, 7, dtype=torch.float64)[None, None, :, None]
    x[0, 0, 0] = 0.0
    q = ca.quantize_kv(x, kv_format("int8"))
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float32 and q.scale.shape == x.shape[:3]
    assert int(q.data.abs().max()) == 127
    err = (q.dequantize(torch.float64) - x).abs()
    assert bool((err <= q.scale.double()[..., None] * (0.5 + 1e-6)).all())
    assert float(q.scale[0, 0, 0]) == 1.0 and int(q.data[0, 0, 0].abs().max()) == 0
    again = ca.quantize_kv(q.dequantize(torch.float64), kv_format("int8"))
    assert torch.equal(again.data, q.data)
    f = ca.quantize_kv(x, kv_format("fp8"))
    assert f.data.dtype == torch.float8_e4m3fn
    err = (f.dequantize(torch.float64) - x).abs()
    bound = torch.maximum(x.abs() * 2.0 ** -3, f.scale.double()[..., None] * 2.0 ** -6)
    assert bool((err <= bound).all())


def test_the_cache_round_trips_and_holds_the_accounts_bytes():
    """An int8 KVCache carved for two micro-batches: a prefill copy and a decode append read back as their
    quantized values; its host bytes are the account's kv_cache part, scales included."""
    from runtime.kv_cache import KVCache, append
    from runtime.packing import layout, pack
    spec = TINY.with_kv_format("int8")
    lens = [5, 9, 3, 7, 12]
    mbs = layout(pack(lens, 3), lens, 4, False)
    kv = KVCache(spec, torch.float32, torch.device("cpu"))
    slots = sum(mb.kv_slots for mb in mbs)
    per_slot = 2 * spec.num_key_value_heads * (spec.head_dim + 4) * spec.num_hidden_layers   # values + fp32 scales
    shape = PassShape.of_layout([mb.size for mb in mbs], [mb.kv_slots for mb in mbs], max(mb.capacity for mb in mbs),
                                0, [(20, 2, 20)], 4)
    acc = account(spec, shape, 0.0, profile=MemoryProfile())
    assert acc.pinned["kv_cache"] == slots * per_slot
    plain = account(TINY, shape, 0.0, profile=MemoryProfile())
    assert acc.pinned["kv_cache"] == pytest.approx(plain.pinned["kv_cache"] / 2 * (1 + 4 / spec.head_dim), rel=1e-12)
    assert acc.pageable["kv_quant_workspace"] > 0 and plain.pageable["kv_quant_workspace"] == 0
    kv.reserve_bytes(acc.pinned["kv_cache"])
    kv.carve(mbs, 0)
    assert kv.host_bytes == slots * per_slot
    g = torch.Generator().manual_seed(3)
    block, kc, vc = kv.blocks(1, 1)[0]
    rows, t = block.size, block.prefill_len
    k = torch.randn(rows, spec.num_key_value_heads, t, spec.head_dim, generator=g)
    kc[:, :, :t].copy_(k)                                          # as the prefill's write into the cache
    want = ca.quantize_kv(k, kv_format("int8"))
    assert torch.equal(kc.data[:, :, :t], want.data) and torch.equal(kc.scale[:, :, :t], want.scale)
    tok_k, tok_v = (torch.randn(rows, spec.num_key_value_heads, spec.head_dim, generator=g) for _ in range(2))
    at = torch.full((rows,), t, dtype=torch.long)
    append(kc, vc, tok_k, tok_v, at)
    for cache, x in ((kc, tok_k), (vc, tok_v)):
        got = cache[:, :, t:t + 1].dequantize(torch.float64)[:, :, 0]
        assert float((got - x.double()).abs().max()) <= float(x.abs().amax(-1).max()) / 127 / 2 * 1.0001
    with pytest.raises(ValueError, match="host only"):
        kv.carve(mbs, 1)


PROMPT_LENS = (5, 9, 3, 7, 12, 4, 8)
POLICIES = [Policy(7, 2), Policy(7, 3, weights_gpu_frac=0.5), Policy(7, 7, schedule="s3"),
            Policy(7, 3, schedule="blocking")]


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def fake_quantized_tokens():
    """The float64 pipeline with a compute-dtype cache that holds dequantize(quantize(k, v)) wherever the int8
    cache quantizes (the prefill's write, each decode append): the int8 pipeline's reference."""
    import runtime.decode as decode
    import runtime.prefill as prefill
    fmt = kv_format("int8")

    def fake(x):
        q = ca.quantize_kv(x, fmt)
        return (q.data.double() * q.scale.double()[..., None]).to(x.dtype)

    real_append, real_copy = decode.append, prefill._copy_prefill_kv
    decode.append = lambda kc, vc, k, v, *a: real_append(kc, vc, fake(k), fake(v), *a)
    prefill._copy_prefill_kv = lambda blocks, rows, k, v: real_copy(blocks, rows, fake(k), fake(v))
    try:
        with Engine(TINY, Policy(7, 7, schedule="s3"), dtype=torch.float64, seed=3, progress=False) as e:
            return e.generate(_prompts(), 6)[0]
    finally:
        decode.append, prefill._copy_prefill_kv = real_append, real_copy


@pytest.mark.parametrize("policy", POLICIES, ids=[p.short() for p in POLICIES])
def test_int8_pipeline_gives_the_tokens_over_the_dequantized_cache(fake_quantized_tokens, policy):
    spec = TINY.with_kv_format("int8")
    with Engine(spec, policy, dtype=torch.float64, seed=3, progress=False) as e:
        tokens, m = e.generate(_prompts(), 6)
        assert isinstance(e.kv.blocks(0, 0)[0][1], ca.QuantKV)
    assert tokens == fake_quantized_tokens
    held, acc = m.allocated_bytes["pinned"], m.account_bytes["pinned"]
    for part in ("kv_cache", "kv_transfer"):
        assert held[part] == pytest.approx(acc[part], abs=1), part


def test_int8_kv_refuses_gpu_attention_and_device_kv():
    spec = TINY.with_kv_format("int8")
    for policy in (Policy(7, 7, attention_on_gpu=True, schedule="s4"), Policy(7, 7, kv_gpu_frac=1.0)):
        with pytest.raises(UnsupportedPolicy, match="CPU attention on the host"):
            Engine(spec, policy, dtype=torch.float32, progress=False)


def test_int8_kv_against_bf16_on_a_real_format_checkpoint(tmp_path):
    """A transformers Mixtral saved as safetensors, int8 KV against bf16 KV through the pipeline: reported as
    measured (printed with -s); held to what round to nearest at 8 bits should keep on a tiny random model."""
    pytest.importorskip("transformers")
    from hrm.hf_config import spec_from_hf_config
    from kv_accuracy import _prompts as prompts_of, compare
    from oracles import hf_tiny_model

    hf_tiny_model("mixtral", max_position_embeddings=64).save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path)
    r = compare(spec, "int8", prompts_of(6, 12, spec.vocab_size), 8, model_dir=tmp_path)
    print(f"\nint8 KV vs bf16 KV, tiny Mixtral checkpoint: {r}")
    assert r["logit_deviation"] < 0.05
    assert r["top1_agreement"] >= 0.9 and r["greedy_agreement"] >= 0.75


def test_kv_formats_price_their_scales():
    for name, f in KV_FORMATS.items():
        spec = TINY.with_kv_format(name)
        assert spec.dtypes.kv_bytes == f.elem_bytes + (4 / TINY.head_dim if f.scaled else 0)
        assert spec.dtypes.kv_format == (name if f.scaled else "")
    assert math.isclose(TINY.with_kv_format("int8").kv_bytes_per_token * 2 / (1 + 4 / 16),
                        TINY.kv_bytes_per_token, rel_tol=1e-12)


def test_plans_for_an_8bit_kv_cache_keep_attention_on_the_host():
    """The runtime reads a scaled 8-bit KV cache on the host only: the search never emits GPU attention or a
    device KV fraction for it, where the same search in bf16 takes GPU attention."""
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.spec import Workload
    from optimizer.search import search

    spec, hw = load_model("mixtral-8x7b").with_expert_format("int4"), load_profile("h200-measured")
    wl = Workload(avg_prompt_len=256, max_prompt_len=256, gen_len=32)
    plain = search(spec, hw, wl, gpu_memory="48GB", cpu_memory="118GiB").policy
    assert plain.attention_on_gpu
    for name in ("int8", "fp8"):
        p = search(spec.with_kv_format(name), hw, wl, gpu_memory="48GB", cpu_memory="118GiB").policy
        assert not p.attention_on_gpu and not p.kv_gpu_frac, name


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_cpu_attention_over_8bit_kv_is_priced_at_its_measured_multiple_of_bf16(name):
    """The fused 8-bit kernel is bound by its arithmetic: a decode layer's CPU attention over an 8-bit cache
    costs its format's measured multiple of the same attention over bf16, not the time of half the bytes."""
    from hrm.estimate import decode_layer_times
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.rates import Setting
    from hrm.spec import Workload

    spec, hw = load_model("mixtral-8x7b"), load_profile("h200-measured")
    wl = Workload(avg_prompt_len=256, max_prompt_len=256, gen_len=32)
    policy = Policy(batch_size=1600, micro_batch_size=800, weights_gpu_frac=0.125)
    times = {kv: decode_layer_times(Setting.of(s, hw, wl, policy), 1600, 800, 0.125, 0.0, 288)
             for kv, s in (("bf16", spec), (name, spec.with_kv_format(name)))}
    assert times["bf16"].cpu_s > 0
    # the profile prices bf16's calls by its loop fit, so its in-loop multiple applies, else the kernels', else the default
    from hrm.rates import cpu_attention_loop_model
    assert cpu_attention_loop_model(Setting.of(spec, hw, wl, policy)) is not None
    in_loop = dict(hw.measured.cpu_attention_loop_time_of_compute_by_kv_format)
    alone = dict(hw.measured.cpu_attention_time_of_compute_by_kv_format)
    expected = in_loop.get(name, alone.get(name, kv_format(name).cpu_attention_time_of_compute))
    assert 0.5 < expected < 2.5
    assert math.isclose(times[name].cpu_s / times["bf16"].cpu_s, expected, rel_tol=1e-9)


def test_a_profiles_measured_multiple_replaces_the_formats_default(tmp_path):
    """A profile that measured its 8-bit kernels (cpu_attention_time_of_compute_by_kv_format) is priced at its
    own multiple; a format it did not measure keeps the default."""
    from hrm.estimate import decode_layer_times
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.rates import Setting
    from hrm.spec import Workload

    text = (Path(__file__).resolve().parent.parent / "hrm/hardware_profiles/h200-measured.toml").read_text()
    keys = ("cpu_attention_time_of_compute_by_kv_format", "cpu_attention_loop_time_of_compute_by_kv_format")
    lines = [ln for ln in text.splitlines() if not ln.startswith(keys)]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("cpu_attention_gb_per_s_by_shape")) + 1
    lines.insert(at, "cpu_attention_time_of_compute_by_kv_format = { int8 = 0.5 }")
    path = tmp_path / "h200-own-int8.toml"
    path.write_text("\n".join(lines) + "\n")
    spec = load_model("mixtral-8x7b")
    wl = Workload(avg_prompt_len=256, max_prompt_len=256, gen_len=32)
    policy = Policy(batch_size=1600, micro_batch_size=800, weights_gpu_frac=0.125)

    def ratios(profile):
        hw = load_profile(str(profile))
        cpu_s = {kv: decode_layer_times(Setting.of(s, hw, wl, policy), 1600, 800, 0.125, 0.0, 288).cpu_s
                 for kv, s in (("bf16", spec), ("int8", spec.with_kv_format("int8")),
                               ("fp8", spec.with_kv_format("fp8")))}
        return {kv: cpu_s[kv] / cpu_s["bf16"] for kv in ("int8", "fp8")}

    got = ratios(path)                      # the kernels alone measured, not the loop: the kernels' multiple
    assert math.isclose(got["int8"], 0.5, rel_tol=1e-9)
    assert math.isclose(got["fp8"], kv_format("fp8").cpu_attention_time_of_compute, rel_tol=1e-9)
    both = tmp_path / "h200-own-int8-in-loop.toml"    # measured in the loop too: the loop's multiple wins
    both.write_text(path.read_text().replace("{ int8 = 0.5 }",
                                             "{ int8 = 0.5 }\ncpu_attention_loop_time_of_compute_by_kv_format = { int8 = 0.7 }"))
    got = ratios(both)
    assert math.isclose(got["int8"], 0.7, rel_tol=1e-9)
    assert math.isclose(got["fp8"], kv_format("fp8").cpu_attention_time_of_compute, rel_tol=1e-9)
    bad = tmp_path / "h200-int4.toml"
    bad.write_text(path.read_text().replace("{ int8 = 0.5 }", "{ int4 = 0.5 }"))
    from hrm.hardware import HardwareError
    with pytest.raises(HardwareError, match=r"unknown KV format\(s\) \['int4'\]"):
        load_profile(str(bad))
