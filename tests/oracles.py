"""Slow reference implementations the tests compare fast paths against."""
import math

import torch

from hrm.spec import ModelSpec

# a tiny Qwen2-MoE: shared expert with its gate, qkv biases, no top-k renormalisation, odd widths
QWEN2 = ModelSpec(name="tiny-qwen2", model_type="qwen2_moe", hidden_size=48, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=8, vocab_size=97, num_experts=5,
                  num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                  shared_expert_gate=True, qkv_bias=True, norm_topk_prob=False)


# tiny transformers models of each family the runtime executes (odd sizes: hidden 48, 3 kv heads x 2
# groups, 3-4 experts, top-2): (config class, model class, family-specific config fields)
HF_COMMON = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                 vocab_size=101, num_experts_per_tok=2, max_position_embeddings=256)
HF_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=3, intermediate_size=40)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=3, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       intermediate_size=40, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=24, intermediate_size=40, head_dim=16,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, intermediate_size=32, norm_topk_prob=False)),
}
# families added by issue 19, each with its distinctive features on: a leading dense layer, MLA (without and
# with a q latent, v narrower than q-k), grouped routing with a scaling factor, a score-correction bias,
# shared experts; gpt-oss's sinks, a window shorter than the prompts on alternating layers, biases and a
# swiglu_limit low enough that the clamps bite; GLM's partial rotary, q/k norms and qkv biases; Hunyuan's
# q/k norms after RoPE and its shared MLP
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=6)
NEW_FAMILIES = {
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(MLA, n_routed_experts=6, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                         first_k_dense_replace=1, q_lora_rank=None, topk_method="group_limited_greedy", n_group=3,
                         topk_group=1, routed_scaling_factor=1.5, num_hidden_layers=3)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(MLA, n_routed_experts=8, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                         first_k_dense_replace=1, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         num_hidden_layers=3)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, intermediate_size=24, head_dim=8, num_hidden_layers=3, sliding_window=5,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"], swiglu_limit=0.25,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=6, moe_intermediate_size=24, intermediate_size=40, n_shared_experts=1,
                      first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, head_dim=16, n_group=3,
                      topk_group=2, routed_scaling_factor=1.8, num_hidden_layers=3,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(num_experts=4, moe_topk=2, intermediate_size=40, head_dim=8, attention_bias=True)),
}


def hf_tiny_model(family: str, seed: int = 0, **overrides):
    """A random tiny transformers model of `family` in eval mode, float32; `overrides` go to its config.
    Norm weights and biases are moved off 1 and 0, which would hide mistakes in them."""
    import transformers

    cfg_cls, model_cls, extra = {**HF_FAMILIES, **NEW_FAMILIES}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**{**HF_COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith(("bias", "sinks")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def naive_decode_attention(q, k, v, starts, ends):
    """One query per sequence over its slots [starts[b], ends[b]), head by head in float64.
    q [B, n_q, d]; k, v [B, n_kv, T, d] -> [B, n_q * d]."""
    b, n_q, d = q.shape
    group = n_q // k.shape[1]
    out = torch.zeros(b, n_q, d, dtype=torch.float64)
    for i in range(b):
        for h in range(n_q):
            keys = k[i, h // group, starts[i]:ends[i]].double()            # [ctx, d]
            vals = v[i, h // group, starts[i]:ends[i]].double()
            w = torch.softmax(keys @ q[i, h].double() / math.sqrt(d), dim=0)
            out[i, h] = w @ vals
    return out.reshape(b, n_q * d)


def bare_profile(name: str):
    """A built-in hardware profile whose process takes no memory of its own (no CUDA context, no
    interpreter baseline, no allocator slack): for tiny models under budgets of kilobytes."""
    from dataclasses import replace

    from hrm.hardware import load_profile
    from hrm.memory import MemoryProfile

    return replace(load_profile(name), memory=MemoryProfile(0.0, 0.0, 0.0, source="none (tests)"))


def bare_profile_file(name: str, directory) -> str:
    """bare_profile as a TOML file in `directory` (for scripts that take a profile path)."""
    from pathlib import Path

    from hrm.hardware import load_profile

    text = Path(load_profile(name).path).read_text()
    path = Path(directory) / f"{name}-bare.toml"
    path.write_text(text + '\n[memory]\ncuda_context_gib = 0\nprocess_baseline_gib = 0\ngpu_allocator_frac = 0\n'
                           'source = "none (tests)"\n')
    return str(path)
