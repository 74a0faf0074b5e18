import json

import pytest

from hrm.hf_config import CONFIG_DIR, builtin_models, load_model, spec_from_hf_config
from hrm.spec import SpecError

KEYS = ["mixtral-8x7b", "mixtral-8x22b", "dbrx", "qwen1.5-moe-a2.7b", "qwen2-57b-a14b", "qwen3-30b-a3b",
        "qwen3-235b-a22b", "olmoe-1b-7b", "deepseek-v2-lite", "deepseek-v3", "deepseek-v3.2", "phi-3.5-moe", "gpt-oss-20b",
        "gpt-oss-120b"]

MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
           "vocab_size": 32000}


def builtin_json(key):
    return json.loads((CONFIG_DIR / f"{key}.json").read_text())


def test_registry_lists_every_model():
    assert sorted(builtin_models()) == sorted(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_builtin_config_parses(key):
    spec = load_model(key)
    assert spec.name == key
    assert spec.total_params > spec.active_params_per_token > 0
    assert spec.num_experts_per_tok <= spec.num_experts
    assert spec.dtypes.name == "bfloat16"


@pytest.mark.parametrize("key,hidden,width,layers,heads,kv,head_dim,experts,topk,vocab", [
    ("mixtral-8x7b", 4096, 14336, 32, 32, 8, 128, 8, 2, 32000),
    ("mixtral-8x22b", 6144, 16384, 56, 48, 8, 128, 8, 2, 32768),
    ("dbrx", 6144, 10752, 40, 48, 8, 128, 16, 4, 100352),
    ("qwen1.5-moe-a2.7b", 2048, 1408, 24, 16, 16, 128, 60, 4, 151936),
    ("qwen2-57b-a14b", 3584, 2560, 28, 28, 4, 128, 64, 8, 151936),
    ("qwen3-30b-a3b", 2048, 768, 48, 32, 4, 128, 128, 8, 151936),
    ("qwen3-235b-a22b", 4096, 1536, 94, 64, 4, 128, 128, 8, 151936),
    ("olmoe-1b-7b", 2048, 1024, 16, 16, 16, 128, 64, 8, 50304),
    ("deepseek-v2-lite", 2048, 1408, 27, 16, 16, 192, 64, 6, 102400),
    ("deepseek-v3", 7168, 2048, 61, 128, 128, 192, 256, 8, 129280),
    ("phi-3.5-moe", 4096, 6400, 32, 32, 8, 128, 16, 2, 32064),
    ("gpt-oss-20b", 2880, 2880, 24, 64, 8, 64, 32, 4, 201088),
    ("gpt-oss-120b", 2880, 2880, 36, 64, 8, 64, 128, 4, 201088),
])
def test_builtin_matches_facts_table(key, hidden, width, layers, heads, kv, head_dim, experts, topk, vocab):
    s = load_model(key)
    assert (s.hidden_size, s.moe_intermediate_size, s.num_hidden_layers, s.num_attention_heads,
            s.num_key_value_heads, s.head_dim, s.num_experts, s.num_experts_per_tok, s.vocab_size) == (
            hidden, width, layers, heads, kv, head_dim, experts, topk, vocab)


def test_mixtral_8x7b_pinned_numbers():
    s = load_model("Mixtral-8x7B")
    assert s.expert_params == 176_160_768 == 3 * 4096 * 14336
    assert s.expert_bytes / 2**20 == 336
    assert s.kv_bytes_per_token == 131072
    assert s.total_params == pytest.approx(46.7e9, rel=0.005)
    assert s.norm_topk_prob and s.rope_theta == 1e6 and s.rms_norm_eps == 1e-5


def test_deepseek_v3():
    s = load_model("deepseek-v3")
    assert s.total_params == pytest.approx(671e9, rel=0.02)
    assert s.kv_elems_per_token_layer == 576
    assert s.attention == "mla" and s.q_lora_rank == 1536 and s.kv_lora_rank == 512
    assert (s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim) == (128, 64, 128)
    assert s.first_dense_layers == 3 and s.dense_intermediate_size == 18432
    assert s.shared_expert_intermediate_size == 2048
    assert s.router == "sigmoid" and s.routed_scaling_factor == 2.5


def test_deepseek_v2_lite():
    s = load_model("deepseek-v2-lite")
    assert s.q_lora_rank == 0
    assert s.first_dense_layers == 1 and s.dense_intermediate_size == 10944
    assert s.shared_expert_intermediate_size == 2 * 1408
    assert s.router == "softmax" and not s.norm_topk_prob


def test_qwen3_30b_a3b():
    s = load_model("qwen3-30b-a3b")
    assert s.total_params == pytest.approx(30.5e9, rel=0.02)
    assert s.active_params_per_token == pytest.approx(3.3e9, rel=0.10)
    assert s.qk_norm and s.norm_topk_prob and not s.qkv_bias


def test_qwen2_moe_shared_expert():
    s = load_model("qwen1.5-moe-a2.7b")
    assert s.shared_expert_intermediate_size == 5632 and s.shared_expert_gate
    assert s.qkv_bias and not s.norm_topk_prob
    assert s.sliding_window == 0


def test_dbrx_and_phimoe_and_olmoe_flags():
    d = load_model("dbrx")
    assert d.norm == "layer" and d.clip_qkv == 8 and d.rope_theta == 500000 and d.max_position_embeddings == 32768
    p = load_model("phi-3.5-moe")
    assert p.qkv_bias and p.o_proj_bias and p.lm_head_bias and p.norm == "layer" and p.sliding_window == 0
    o = load_model("olmoe-1b-7b")
    assert o.qk_norm and not o.norm_topk_prob


def test_gpt_oss():
    s = load_model("gpt-oss-20b")
    assert s.num_sliding_layers == 12 and s.sliding_window == 128
    assert s.attention_sinks and s.qkv_bias and s.head_dim == 64
    assert load_model("gpt-oss-120b").num_sliding_layers == 18


def test_gpt_oss_without_layer_types_alternates():
    raw = builtin_json("gpt-oss-20b")
    del raw["layer_types"]
    assert spec_from_hf_config(raw).num_sliding_layers == 12


def test_missing_field_names_it():
    raw = dict(MIXTRAL)
    del raw["hidden_size"]
    with pytest.raises(SpecError, match="mixtral config: missing field 'hidden_size'"):
        spec_from_hf_config(raw)


def test_missing_expert_count_names_it():
    raw = dict(MIXTRAL)
    del raw["num_local_experts"]
    with pytest.raises(SpecError, match="num_local_experts"):
        spec_from_hf_config(raw)


def test_missing_nested_dbrx_field():
    raw = builtin_json("dbrx")
    del raw["ffn_config"]["moe_top_k"]
    with pytest.raises(SpecError, match="dbrx config: missing field 'ffn_config.moe_top_k'"):
        spec_from_hf_config(raw)


def test_unknown_model_type():
    with pytest.raises(SpecError, match="unsupported model_type 'xyz'; supported: mixtral"):
        spec_from_hf_config(dict(MIXTRAL, model_type="xyz"))


def test_dense_model_type():
    raw = {k: v for k, v in MIXTRAL.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    with pytest.raises(SpecError, match="'llama'.*not a supported MoE family"):
        spec_from_hf_config(dict(raw, model_type="llama"))


def test_bad_values_rejected():
    with pytest.raises(SpecError, match="'hidden_size'"):
        spec_from_hf_config(dict(MIXTRAL, hidden_size="4096"))
    with pytest.raises(SpecError, match="top-k"):
        spec_from_hf_config(dict(MIXTRAL, num_experts_per_tok=9))
    with pytest.raises(SpecError, match="unknown dtype"):
        spec_from_hf_config(dict(MIXTRAL, torch_dtype="float64"))


def test_defaults_and_name():
    raw = {k: v for k, v in MIXTRAL.items() if k != "num_key_value_heads"}
    s = spec_from_hf_config(raw)
    assert s.num_key_value_heads == 32 and s.name == "mixtral"
    assert not s.tie_word_embeddings and s.dtypes.name == "bfloat16"
    assert spec_from_hf_config(dict(MIXTRAL, _name_or_path="org/m")).name == "org/m"
    assert spec_from_hf_config(dict(MIXTRAL, _name_or_path="org/m"), name="mine").name == "mine"


def test_transformers5_style_config():
    raw = builtin_json("qwen3-30b-a3b")
    del raw["torch_dtype"], raw["rope_theta"]
    raw.update(dtype="float16", rope_parameters={"rope_theta": 5e6, "rope_type": "default"},
               layer_types=["full_attention"] * 48)
    s = spec_from_hf_config(raw)
    assert s.dtypes.name == "float16" and s.dtypes.weight_bytes == 2
    assert s.rope_theta == 5e6 and s.num_sliding_layers == 0


def test_rope_theta_under_rope_scaling():
    s = spec_from_hf_config(dict(MIXTRAL, rope_scaling={"rope_type": "default", "rope_theta": 2e6}))
    assert s.rope_theta == 2e6


def test_config_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL))
    from_file = spec_from_hf_config(tmp_path / "config.json")
    from_dir = spec_from_hf_config(str(tmp_path), name="local")
    assert from_file.expert_params == from_dir.expert_params == 176_160_768
    assert from_dir.name == "local"
    assert load_model(tmp_path).hidden_size == 4096
    assert load_model(str(tmp_path / "config.json")).num_experts == 8


def test_missing_path_and_unknown_name():
    with pytest.raises(SpecError, match="no config.json"):
        spec_from_hf_config("/nonexistent/dir")
    with pytest.raises(SpecError, match="built-in: .*mixtral-8x7b"):
        load_model("not-a-model")


def test_load_by_hub_id():
    assert load_model("mistralai/Mixtral-8x7B-Instruct-v0.1").name == "mixtral-8x7b"


# ---- quantization_config -------------------------------------------------------------------------

def routed_expert_bytes(spec):
    return spec.num_moe_layers * spec.num_experts * spec.expert_bytes


def test_gpt_oss_experts_priced_in_mxfp4_attention_in_bf16():
    spec = load_model("gpt-oss-120b")
    assert spec.dtypes.expert_weight_bytes == 4.25 / 8 and spec.dtypes.weight_bytes == 2.0
    assert routed_expert_bytes(spec) == pytest.approx(60.9e9, rel=0.005)          # not ~229 GB of bf16
    bf16 = spec_from_hf_config({k: v for k, v in builtin_json("gpt-oss-120b").items() if k != "quantization_config"})
    assert routed_expert_bytes(bf16) == pytest.approx(229.0e9, rel=0.005)
    assert spec.weight_bytes == pytest.approx(bf16.weight_bytes - routed_expert_bytes(bf16) + routed_expert_bytes(spec))
    assert "mxfp4" in spec.dtypes.quantization and not bf16.dtypes.quantization


def test_deepseek_v3_priced_in_fp8():
    spec = load_model("deepseek-v3")
    assert spec.dtypes.weight_bytes == spec.dtypes.expert_weight_bytes == 1 + 4 / 128 ** 2   # fp32 per block
    assert spec.weight_bytes == pytest.approx(671e9, rel=0.005)
    assert spec.dtypes.name == "bfloat16" and spec.dtypes.kv_bytes == 2.0              # compute, KV unchanged


@pytest.mark.parametrize("qc,experts,other", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, 0.5 + 2.5 / 128, None),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1}, 1.0, None),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False}, 0.5 + 2 / 64, None),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["self_attn"]},
     0.5 + 2.5 / 128, 2.0),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, 0.5625, None),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_use_double_quant": True},
     0.5 + (1 + 4 / 256) / 64, None),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": ["lm_head", "experts"]},
     2.0, 1.0),
    ({"quant_method": "fp8"}, 1.0, None),
])
def test_quantization_formats(qc, experts, other):
    spec = spec_from_hf_config(dict(MIXTRAL, quantization_config=qc))
    assert spec.dtypes.expert_weight_bytes == pytest.approx(experts)
    assert spec.dtypes.weight_bytes == pytest.approx(experts if other is None else other)
    assert spec.expert_bytes == pytest.approx(spec.expert_params * experts)
    assert spec.dtypes.quantization.startswith(f"quantization_config {qc['quant_method']}")


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "hqq"}, "'quantization_config.quant_method' is 'hqq'"),
    ({"bits": 4}, "missing field 'quantization_config.quant_method'"),
    ({"quant_method": "gptq", "bits": 5}, "'quantization_config.bits'"),
    ({"quant_method": "gptq"}, "missing field 'quantization_config.bits'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, "'quantization_config.group_size'"),
    ({"quant_method": "bitsandbytes"}, "'load_in_4bit'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "'quantization_config.weight_block_size'"),
    ("fp8", "field 'quantization_config' must be an object"),
])
def test_bad_quantization_config_is_one_line_naming_the_field(qc, needle):
    with pytest.raises(SpecError) as e:
        spec_from_hf_config(dict(MIXTRAL, quantization_config=qc))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_runtime_refuses_a_quantized_spec():
    pytest.importorskip("torch")
    from runtime.model import UnsupportedModel, check_supported

    plain = spec_from_hf_config(MIXTRAL)
    check_supported(plain)
    with pytest.raises(UnsupportedModel, match="quantization_config gptq int4 g128") as e:
        check_supported(spec_from_hf_config(dict(MIXTRAL, quantization_config={"quant_method": "gptq", "bits": 4})))
    assert "\n" not in str(e.value)


def test_plan_digest_of_an_unquantized_spec_is_unchanged_by_the_new_fields():
    from optimizer.plan import spec_to_dict
    d = spec_to_dict(load_model("mixtral-8x7b"))
    assert set(d["dtypes"]) == {"weight_bytes", "kv_bytes", "act_bytes", "name"}
    q = spec_to_dict(load_model("gpt-oss-20b"))["dtypes"]
    assert q["expert_weight_bytes"] == 0.53125 and "mxfp4" in q["quantization"]


def test_dbrx_ffn_config_not_an_object_names_the_field():
    raw = json.loads((CONFIG_DIR / "dbrx.json").read_text())
    raw["ffn_config"] = [1, 2]
    with pytest.raises(SpecError, match="field 'ffn_config' must be an object"):
        spec_from_hf_config(raw)
