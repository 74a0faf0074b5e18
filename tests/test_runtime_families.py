"""The families issue 19 added to the runtime (DeepSeek-V2/V3 with MLA, gpt-oss, GLM-4.5, Hunyuan-A13B) against
transformers: a tiny random model of each with its distinctive features on (oracles.NEW_FAMILIES), saved with
save_pretrained (safetensors + config.json), loaded by our checkpoint loader; fp32 logits of the reference
forward within 1e-4 relative of transformers' and the engine's greedy tokens (the pipeline: prefill, CPU
attention over the host KV cache, decode) equal to transformers' generate, under two micro-batches with
experts streamed; what is not implemented is refused naming the field."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hrm.hf_config import spec_from_hf_config  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from oracles import HF_COMMON, NEW_FAMILIES, hf_tiny_model  # noqa: E402
from runtime.checkpoint import load_checkpoint  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import UnsupportedModel, check_supported, forward  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402

torch.set_num_threads(1)
MAX_REL_ERR = 1e-4
TOKENS = [3, 17, 99, 42, 0, 7, 64, 5, 88, 23, 11, 100, 2]
PROMPTS = [TOKENS, [8, 1, 90], [4, 4, 61, 30, 9]]
NEW_TOKENS = 8
YARN_MSCALE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
               "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = [(f, {}) for f in NEW_FAMILIES] + [
    ("deepseek_v2", {"rope_parameters": YARN_MSCALE}),                 # DeepSeek-V2-Lite's RoPE: softmax scale x mscale^2
    ("deepseek_v3", {"rope_interleave": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
]


def _ids(case):
    family, extra = case
    return family + "".join(f"-{k}" for k in extra)


def _rel_err(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _pipeline_logits(monkeypatch, engine, prompt: list[int]) -> torch.Tensor:
    """The logits the pipeline samples each token of one prompt from (prefill's, then every decode step's):
    [NEW_TOKENS, vocab]."""
    from runtime import decode, prefill
    seen = []

    def recording(sample):
        return lambda logits, *a: seen.append(logits.clone()) or sample(logits, *a)
    monkeypatch.setattr(prefill, "sample", recording(prefill.sample))
    monkeypatch.setattr(decode, "sample", recording(decode.sample))
    engine.generate([prompt], max_new_tokens=NEW_TOKENS)
    return torch.cat(seen)


@pytest.mark.parametrize("family, extra", CASES, ids=[_ids(c) for c in CASES])
def test_new_family_matches_transformers(tmp_path, monkeypatch, family, extra):
    model = hf_tiny_model(family, max_position_embeddings=64, **extra)
    model.save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path)
    check_supported(spec)
    store = WeightStore(spec, torch.float32, "cpu", num_resident=1, num_pages=2)
    load_checkpoint(tmp_path, store, progress=False)
    tokens = torch.tensor(TOKENS)
    ours = forward(tokens, store.dense, store.at_rest, spec)
    with torch.no_grad():
        ref = model(tokens[None]).logits[0]
    err = _rel_err(ours, ref)
    print(f"{_ids((family, extra))}: max relative logit error {err:.2e}")
    assert err < MAX_REL_ERR

    with Engine(spec, Policy(3, 2), model_dir=tmp_path, dtype=torch.float32) as engine:
        generated, _ = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        pipeline = _pipeline_logits(monkeypatch, engine, TOKENS)
    for prompt, got in zip(PROMPTS, generated):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()
    # the pipeline's own logits (prefill, then decode over the KV cache) against transformers' over the text
    with torch.no_grad():
        full = model(torch.tensor([TOKENS + generated[0][:-1]])).logits[0, len(TOKENS) - 1:]
    err = _rel_err(pipeline, full)
    print(f"{_ids((family, extra))}: pipeline's max relative logit error {err:.2e}")
    assert err < MAX_REL_ERR


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_grouped_expert_path_matches_transformers(tmp_path, monkeypatch, family):
    """Above MOE_DENSE_MAX_TOKENS the MoE takes the grouped path (expert biases and the clamped GLU per pair),
    the exact split in prefill, the sync-free one in decode: the same greedy tokens."""
    from runtime import moe
    if not moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch has no CPU grouped GEMM")
    monkeypatch.setattr(moe, "MOE_DENSE_MAX_TOKENS", 1)
    model = hf_tiny_model(family, max_position_embeddings=64)
    model.save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path)
    used = []
    grouped_slice = moe._grouped_slice
    monkeypatch.setattr(moe, "_grouped_slice", lambda *a: used.append(a[-1]) or grouped_slice(*a))
    with Engine(spec, Policy(3, 2), model_dir=tmp_path, dtype=torch.float32) as engine:
        generated, _ = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert set(used) == {True, False}
    for prompt, got in zip(PROMPTS, generated):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


def _spec(family, **fields):
    cfg_cls, _, extra = NEW_FAMILIES[family]
    import transformers
    config = getattr(transformers, cfg_cls)(**{**HF_COMMON, **extra, **fields})
    return spec_from_hf_config(dict(config.to_dict(), model_type=family))


@pytest.mark.parametrize("family, fields, words", [
    ("deepseek_v2", dict(attention_bias=True), "attention_bias=true with MLA"),
    ("deepseek_v3", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func 'softmax'"),
    ("glm4_moe", dict(n_group=4), "n_group 4 / topk_group 2 for 6 experts"),
    ("gpt_oss", dict(quantization_config={"quant_method": "mxfp4"}), "quantization_config mxfp4 experts"),
    ("hunyuan_v1_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5"),
])
def test_what_the_runtime_does_not_implement_is_refused_naming_the_field(family, fields, words):
    check_supported(_spec(family))
    with pytest.raises(UnsupportedModel, match=words):
        check_supported(_spec(family, **fields))


def test_a_window_on_layers_the_config_does_not_name_is_refused():
    """Mixtral's sliding_window applies to every layer in transformers, but ModelSpec does not name them."""
    spec = spec_from_hf_config(dict(HF_COMMON, model_type="mixtral", num_local_experts=3, intermediate_size=40,
                                    sliding_window=8, max_position_embeddings=64))
    with pytest.raises(UnsupportedModel, match="sliding_window 8 on layers the config does not name"):
        check_supported(spec)


def test_mla_memory_account_names_the_latent_parts():
    """MLA's cache holds kv_lora_rank + rope elements per token and layer, the pass's buffers the absorbed queries
    and the latent entry, the output in the latent space; only MoE layers hold experts."""
    from hrm.memory import PassShape, account, attention_out_elems_per_token, qkv_elems_per_token
    from hrm.spec import Workload
    from oracles import bare_profile
    spec = _spec("deepseek_v2")
    assert spec.kv_elems_per_token_layer == 16 + 8 and qkv_elems_per_token(spec) == 7 * 24
    assert attention_out_elems_per_token(spec) == 6 * 16 and spec.rotary_dim == 8
    acc = account(spec, PassShape.nominal(Workload.uniform(16, 4), 8, 4, 0.0), 0.0, profile=bare_profile("h200").memory)
    assert acc.pinned["offloaded_experts"] == spec.num_moe_layers * spec.num_experts * spec.expert_bytes
    assert acc.pinned["kv_cache"] == 8 * (16 + 3) * 24 * spec.num_hidden_layers * spec.dtypes.kv_bytes


DEVICE_ATTENTION = {  # the schedules that attend on the device: over copies of the host cache, or a device cache
    "s4-streamed-kv": Policy(3, 2, attention_on_gpu=True, schedule="s4"),
    "s4-device-kv": Policy(3, 2, attention_on_gpu=True, kv_gpu_frac=1.0, schedule="s4"),
}


@pytest.mark.parametrize("policy", DEVICE_ATTENTION, ids=list(DEVICE_ATTENTION))
@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_device_attention_matches_transformers(tmp_path, family, policy):
    """MLA's latent cache and gpt-oss's sinks and windows attended on the device (S4, the runtime's GPU
    attention path run on the CPU): the same greedy tokens as transformers."""
    model = hf_tiny_model(family, max_position_embeddings=64)
    model.save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path)
    with Engine(spec, DEVICE_ATTENTION[policy], model_dir=tmp_path, dtype=torch.float32) as engine:
        generated, _ = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for prompt, got in zip(PROMPTS, generated):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("pad", [0, 3])
def test_mla_prefill_matmul_equals_sdpa(monkeypatch, dtype, tol, pad):
    """MLA's prefill through one GEMM per sequence over its shared latent (attention.MLA_PREFILL_KERNEL
    "matmul") gives what SDPA with GQA over one kv head gives, left padding and odd sizes included."""
    from runtime import attention
    g = torch.Generator().manual_seed(0)
    b, s, n_q, r, rope = 3, 11, 5, 24, 8
    q = torch.randn(b, s, n_q, r + rope, generator=g).to(dtype)
    k = torch.randn(b, s, 1, r + rope, generator=g).to(dtype)
    la = attention.LayerAttention(scale=0.3, shared_kv=True)
    out = {}
    for kernel in ("matmul", "sdpa"):
        monkeypatch.setattr(attention, "MLA_PREFILL_KERNEL", kernel)
        out[kernel] = attention.causal(q, k, k[..., :r], pad, la).float()
    assert out["matmul"].shape == (b, s, n_q * r)
    assert _rel_err(out["matmul"], out["sdpa"]) < tol
