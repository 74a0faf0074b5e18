"""Every config feature of the executed families is computed as transformers defines it, or refused:
each RoPE type (default, linear, dynamic, yarn, llama3; through `rope_parameters` or the legacy
`rope_scaling`), attention / qkv biases present and absent. fp32 logits within 1e-4 relative of
transformers' forward and the engine's greedy tokens equal to transformers' generate."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hrm.policy import Policy  # noqa: E402
from hrm.hf_config import spec_from_hf_config  # noqa: E402
from hrm.spec import SpecError  # noqa: E402
from oracles import HF_COMMON, HF_FAMILIES, hf_tiny_model  # noqa: E402
from runtime.checkpoint import load_checkpoint  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.model import UnsupportedModel, check_supported, forward  # noqa: E402
from runtime.weights import WeightStore  # noqa: E402

torch.set_num_threads(1)
MAX_REL_ERR = 1e-4
# contexts run to 21 tokens, past the 16 original positions the yarn and llama3 entries scale from
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-tuned": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
                   "beta_slow": 2.0, "truncate": False, "attention_factor": 0.8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}
BIAS_FLIPS = {"qwen2_moe": {"qkv_bias": False}, "qwen3_moe": {"attention_bias": True},
              "olmoe": {"attention_bias": True}}
CASES = ([(f, r, {}) for f in HF_FAMILIES for r in ROPES]
         + [(f, r, flip) for f, flip in BIAS_FLIPS.items() for r in ("default", "yarn")])
TOKENS = [3, 17, 99, 42, 0, 7, 64, 5, 88, 23, 11, 100, 2]
PROMPTS = [TOKENS, [8, 1, 90]]
NEW_TOKENS = 8


def _checkpoint(tmp_path, family, rope, extra):
    overrides = dict(extra, max_position_embeddings=64)
    if family == "mixtral":   # transformers' dynamic and yarn read config.head_dim, which Mixtral leaves None
        overrides["head_dim"] = 8
    if ROPES[rope] is not None:
        overrides["rope_parameters"] = {"rope_theta": 10000.0, **ROPES[rope]}
    model = hf_tiny_model(family, **overrides)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family, rope, extra", CASES,
                         ids=[f"{f}-{r}" + "".join(f"-{k}={v}" for k, v in e.items()) for f, r, e in CASES])
def test_parity_with_transformers(tmp_path, family, rope, extra):
    model = _checkpoint(tmp_path, family, rope, extra)
    spec = spec_from_hf_config(tmp_path)
    assert (spec.rope_parameters is None) == (rope == "default")
    store = WeightStore(spec, torch.float32, "cpu", num_resident=1, num_pages=2)
    load_checkpoint(tmp_path, store, progress=False)
    tokens = torch.tensor(TOKENS)
    ours = forward(tokens, store.dense, store.at_rest, spec)
    with torch.no_grad():
        ref = model(tokens[None]).logits[0]
    assert float((ours - ref).abs().max() / ref.abs().max()) < MAX_REL_ERR

    with Engine(spec, Policy(2, 1), model_dir=tmp_path, dtype=torch.float32) as engine:
        generated, _ = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for prompt, got in zip(PROMPTS, generated):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == want[0, len(prompt):].tolist()


def _config(family="qwen3_moe", **fields) -> dict:
    return {"model_type": family, **HF_COMMON, **HF_FAMILIES[family][2], "max_position_embeddings": 64, **fields}


@pytest.mark.parametrize("rope", [r for r in ROPES if r != "default"])
def test_legacy_rope_scaling_key_reads_the_same(rope):
    legacy = {("type" if k == "rope_type" else k): v for k, v in ROPES[rope].items()}
    new = spec_from_hf_config(_config(rope_parameters={"rope_theta": 5e5, **ROPES[rope]}))
    old = spec_from_hf_config(_config(rope_theta=5e5, rope_scaling=legacy))
    assert new == old and new.rope_theta == 5e5


def test_yarn_attention_factor_from_mscale():
    """DeepSeek's form: no attention_factor, mscale / mscale_all_dim, factor from the context ratio."""
    spec = spec_from_hf_config(_config(rope_scaling={"type": "yarn", "mscale": 1.0, "mscale_all_dim": 0.5,
                                                          "original_max_position_embeddings": 16}))
    r = spec.rope_parameters
    assert r.factor == 4.0
    assert r.attention_factor == pytest.approx((0.1 * 1.0 * 1.3862943611 + 1) / (0.1 * 0.5 * 1.3862943611 + 1))


@pytest.mark.parametrize("fields, words", [
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}),
     "rope_parameters.rope_type 'longrope'"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
])
def test_rope_the_runtime_cannot_compute_is_refused(fields, words):
    spec = spec_from_hf_config(_config(**fields))
    with pytest.raises(UnsupportedModel, match=words):
        check_supported(spec)


@pytest.mark.parametrize("fields, words", [
    (dict(rope_parameters={"rope_type": "linear"}), "missing field 'rope_parameters.factor'"),
    (dict(rope_scaling={"type": "linear", "factor": -2}), "'rope_scaling.factor' must be positive"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
     "missing field 'rope_parameters.high_freq_factor'"),
    (dict(rope_scaling=[1, 2]), "field 'rope_scaling' must be an object"),
    (dict(partial_rotary_factor=1.5), "'partial_rotary_factor' must be in (0, 1]"),
])
def test_malformed_rope_config_names_the_field(fields, words):
    with pytest.raises(SpecError) as e:
        spec_from_hf_config(_config(**fields))
    assert words in str(e.value)


def test_context_past_max_positions_is_refused(tmp_path):
    """Within max_position_embeddings dynamic RoPE is plain RoPE; past it, the engine refuses."""
    _checkpoint(tmp_path, "qwen3_moe", "dynamic", {})
    spec = spec_from_hf_config(tmp_path)
    with Engine(spec, Policy(2, 1), model_dir=tmp_path, dtype=torch.float32) as engine:
        with pytest.raises(ValueError, match="context of 65 tokens .* max_position_embeddings 64"):
            engine.generate([[1] * 60], max_new_tokens=5)


def test_plan_round_trips_rope_parameters(tmp_path):
    from optimizer.plan import spec_from_dict, spec_to_dict
    spec = spec_from_hf_config(_config(rope_parameters={"rope_theta": 1e4, **ROPES["llama3"]}))
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    plain = spec_from_hf_config(_config())
    assert "rope_parameters" not in spec_to_dict(plain)


# tiny configs of every family the HRM reads, for transformers to build (HF_COMMON's widths)
PARAM_CONFIGS = {
    "mixtral": dict(num_local_experts=3, intermediate_size=40),
    "qwen2_moe": dict(num_experts=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      intermediate_size=40),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=16),
    "olmoe": dict(num_experts=3, intermediate_size=32),
    "dbrx": dict(d_model=48, n_heads=6, n_layers=2, attn_config={"kv_n_heads": 3, "rope_theta": 1e4},
                 ffn_config={"moe_num_experts": 3, "moe_top_k": 2, "ffn_hidden_size": 40}),
    "deepseek_v2": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy", n_group=1, topk_group=1),
    "deepseek_v3": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "phimoe": dict(num_local_experts=3, intermediate_size=40),
    "gpt_oss": dict(num_local_experts=3, intermediate_size=40, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=4, intermediate_size=40),
    "granitemoeshared": dict(num_local_experts=4, intermediate_size=40, shared_intermediate_size=32,
                             attention_bias=True),
    "glm4_moe": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                     first_k_dense_replace=1, attention_bias=True, use_qk_norm=True),
    "exaone_moe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, num_shared_experts=1,
                       mlp_layer_types=["dense", "sparse"], head_dim=8),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=24, intermediate_size=40,
                         moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=1),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, intermediate_size=40, head_dim=8, attention_bias=True),
    "solar_open": dict(n_routed_experts=4, moe_intermediate_size=24, head_dim=8, attention_bias=True),
    "sarvam_moe": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8,
                       first_k_dense_replace=1),
    "glm4_moe_lite": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                          kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                          mlp_layer_types=["dense", "sparse"]),
    "mellum": dict(num_local_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8,
                   mlp_layer_types=["dense", "sparse"]),
    "aria_text": dict(moe_num_experts=4, moe_topk=2, intermediate_size=40, head_dim=8, moe_num_shared_experts=2),
    "flex_olmo": dict(num_experts=4, intermediate_size=40, pad_token_id=0),
    "cohere2_moe": dict(num_experts=4, intermediate_size=40, head_dim=8, pad_token_id=0, attention_bias=True),
    "kolibri1": dict(num_local_experts=6, moe_intermediate_size=24, head_dim=8, shared_expert_intermediate_size=32),
    "afmoe": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8, num_dense_layers=1,
                  num_shared_experts=2),
    "laguna": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8,
                   shared_expert_intermediate_size=32, mlp_layer_types=["dense", "sparse"],
                   num_attention_heads_per_layer=[6, 6]),
    "dots1": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=2,
                  first_k_dense_replace=1, attention_bias=True, sliding_window=16, max_window_layers=1),
    "minimax_m2": dict(num_local_experts=4, intermediate_size=24, head_dim=8, rotary_dim=4),
    "hy_v3": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8, num_shared_experts=2,
                  mlp_layer_types=["dense", "sparse"], attention_bias=True),
    "granitemoe_swa": dict(num_local_experts=4, intermediate_size=40, shared_intermediate_size=32,
                           layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "sarvam_mla": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                       first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                       v_head_dim=8),
    "axk1": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                 mlp_layer_types=["dense", "sparse"], kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                 qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "flint": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8,
                  shared_expert_intermediate_size=32, mlp_only_layers=[0], attention_bias=True),
    "deepseek_v32": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                         first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, index_topk=4,
                         index_n_heads=2, index_head_dim=8),
    "glm_moe_dsa": dict(n_routed_experts=4, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                        mlp_layer_types=["dense", "sparse"], kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, index_topk=4,
                        index_n_heads=2, index_head_dim=8),
    "minimax_m3_vl_text": dict(num_local_experts=4, intermediate_size=24, head_dim=8, shared_intermediate_size=32,
                               dense_intermediate_size=40, mlp_layer_types=["dense", "sparse"],
                               layer_types=["full_attention", "full_attention"]),
    "beam": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=8, n_group=1, topk_group=1,
                 mlp_layer_types=["dense", "sparse"], attention_bias=True),
    "llama4_text": dict(num_local_experts=4, intermediate_size=40, head_dim=8, attention_bias=True,
                        attention_chunk_size=16),
    "qwen3_next": dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=32, head_dim=8,
                       attention_bias=True, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=6, linear_conv_kernel_dim=4),
    "lara_mini": dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=32, head_dim=8,
                      layer_types=["linear_attention", "sliding_attention"], sliding_window=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                      linear_value_head_dim=6, linear_conv_kernel_dim=4),
    "kimi_linear": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4,
                        linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse"], num_expert_group=1, topk_group=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2),
    "bailing_hybrid": dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4,
                           linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"],
                           mlp_layer_types=["dense", "sparse"], num_expert_group=1, topk_group=1, pad_token_id=0,
                           eos_token_id=2),
    "granitemoehybrid": dict(num_local_experts=4, intermediate_size=24, shared_intermediate_size=32,
                             layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8,
                             mamba_d_head=24, mamba_d_conv=4, mamba_expand=2),
    "minimax": dict(num_local_experts=4, intermediate_size=24, head_dim=8,
                    layer_types=["linear_attention", "full_attention"]),
    "qwen3_5_moe_text": dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                             head_dim=8, layer_types=["linear_attention", "full_attention"],
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=6, linear_conv_kernel_dim=4),
}


PARAM_CONFIGS["qwen3_5_moe"] = PARAM_CONFIGS["qwen3_5_moe_text"]
COMPOSITE = ("qwen3_5_moe",)


@pytest.mark.parametrize("family", sorted(PARAM_CONFIGS))
def test_parameter_count_is_exact_against_transformers(family):
    """Every tensor counts: biases, q/k norms of either width, LayerNorm biases, MLA's latent norms,
    gpt-oss's expert and router biases and sinks."""
    import warnings

    from hrm.hf_config import FAMILIES
    transformers = pytest.importorskip("transformers")
    assert set(PARAM_CONFIGS) == set(FAMILIES)
    common = {k: v for k, v in HF_COMMON.items() if family != "dbrx" or k == "vocab_size"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family in COMPOSITE:      # the causal LM's fields live in the composite config's text_config
            config = transformers.AutoConfig.for_model(family, text_config=dict(common, **PARAM_CONFIGS[family]))
        else:
            config = transformers.AutoConfig.for_model(family, **common, **PARAM_CONFIGS[family])
        model = transformers.AutoModelForCausalLM.from_config(config)
    raw = dict(config.to_dict(), model_type=family)
    assert spec_from_hf_config(raw).total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, fields, words", [
    ("ernie4_5_moe", dict(use_bias=True), "use_bias=true"),
    ("ernie4_5_moe", dict(moe_layer_interval=2), "interleave dense and MoE layers"),
    ("exaone_moe", dict(mlp_layer_types=["sparse", "dense"]), "'mlp_layer_types' interleaves"),
    ("hunyuan_v1_moe", dict(moe_topk=[2, 1]), "'moe_topk' varies by layer"),
    ("hy_v3", dict(mlp_bias=True), "mlp_bias=true"),
    ("flint", dict(mlp_only_layers=[1]), "'mlp_only_layers'=\\[1\\] interleaves"),
    ("deepseek_v32", dict(layer_types=["indexed_attention", "full_attention"]), "mixes indexed and other"),
    ("minimax_m3_vl_text", dict(layer_types=["full_attention", "minimax_m3_sparse"]), "'minimax_m3_sparse' layers"),
    ("llama4_text", dict(interleave_moe_layer_step=2), "'interleave_moe_layer_step'=2 interleaves"),
    ("llama4_text", dict(moe_layers=[1]), "'moe_layers'=\\[1\\] interleaves"),
])
def test_what_a_new_family_cannot_be_priced_as_is_refused_naming_it(family, fields, words):
    transformers = pytest.importorskip("transformers")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(family, **HF_COMMON, **PARAM_CONFIGS[family])
    spec_from_hf_config(dict(config.to_dict(), model_type=family))               # priced as it is ...
    with pytest.raises(SpecError, match=words):                                      # ... and refused with the field
        spec_from_hf_config(dict(config.to_dict(), model_type=family, **fields))


@pytest.mark.parametrize("family, words", [
    ("zaya", "'hybrid' layers"),
    ("nemotron_h", "layers"), ("jamba", "Mamba layers"),
])
def test_layers_that_cannot_be_priced_are_named(family, words):
    """Hybrid models are refused by the kind of layer the spec cannot describe, not by an unknown name."""
    transformers = pytest.importorskip("transformers")
    raw = dict(transformers.AutoConfig.for_model(family).to_dict(), model_type=family)
    with pytest.raises(SpecError, match=words):
        spec_from_hf_config(raw)


@pytest.mark.parametrize("kind", ["linear_attention", "chunked_attention"])
def test_a_supported_family_with_an_unpriced_layer_kind_is_refused(kind):
    """Chunked attention is priced only where the family's reader knows its chunk (llama4_text)."""
    raw = _config("qwen3_moe", layer_types=["full_attention", kind])
    with pytest.raises(SpecError, match=f"'{kind}' layers"):
        spec_from_hf_config(raw)


def test_llama4_chunked_layers_are_priced_as_windows_of_the_chunk():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model("llama4_text", **HF_COMMON, **PARAM_CONFIGS["llama4_text"])
    spec = spec_from_hf_config(dict(config.to_dict(), model_type="llama4_text"))
    assert (spec.sliding_window, spec.num_sliding_layers) == (16, spec.num_hidden_layers)
    assert spec.router == "sigmoid" and spec.shared_expert_intermediate_size == 40


def test_linear_attention_layers_hold_a_fixed_state_instead_of_kv():
    """Qwen3-Next: its linear-attention layers keep no KV cache (the KV bytes per token are the softmax
    layers' share) but a fixed state per sequence in the account; their decode cost does not grow with the
    context, the softmax layers' does."""
    from dataclasses import replace
    from hrm import ops
    from hrm.memory import PassShape, account
    from hrm.spec import Workload
    from hrm.hardware import load_profile
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model("qwen3_next", **HF_COMMON, **PARAM_CONFIGS["qwen3_next"])
    spec = spec_from_hf_config(dict(config.to_dict(), model_type="qwen3_next"))
    dense = replace(spec, num_linear_layers=0)
    assert spec.num_linear_layers == 1 and spec.kv_bytes_per_token == dense.kv_bytes_per_token / 2
    state = spec.linear_state_bytes_per_sequence()
    assert state == 4 * 8 * 6 * 4.0 + (2 * 2 * 8 + 4 * 6) * 3 * spec.dtypes.act_bytes
    acc = account(spec, PassShape.nominal(Workload.uniform(16, 4), 8, 4, 0.0), 0.0,
                  profile=load_profile("h200-measured").memory)
    assert acc.pinned["linear_state"] == 8 * state and acc.gpu["linear_state"] == 0
    grow = lambda s: ops.attention(s, 8, 1, 2000).flops - ops.attention(s, 8, 1, 1000).flops  # noqa: E731
    assert grow(spec) == pytest.approx(grow(dense) / 2)
    assert ops.linear_attention(spec, 8, 1).flops == pytest.approx(8 * 8.0 * 4 * 8 * 6)


@pytest.mark.parametrize("family, words", [
    ("doge", "'keep_window_size'"), ("gemma4_text", "'per_layer_config'"), ("jetmoe", "attention experts"),
    ("lfm2_moe", "short-convolution layers"), ("longcat_flash", "'zero_expert_num'"),
    ("mimo_v2_flash", "own KV-head count"),
])
def test_families_that_are_not_priced_say_which_feature(family, words):
    transformers = pytest.importorskip("transformers")
    raw = dict(transformers.AutoConfig.for_model(family).to_dict(), model_type=family)
    with pytest.raises(SpecError, match=words):
        spec_from_hf_config(raw)
