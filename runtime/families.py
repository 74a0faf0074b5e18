"""What the executed families differ in beyond ModelSpec's fields: where their checkpoints keep a tensor
(transformers' names under model.layers.i.) and the few per-family rules of their layers."""
from __future__ import annotations

SCORE_CORRECTION_BIAS = ("deepseek_v3", "glm4_moe")
"""Routers that choose experts by sigmoid score + e_score_correction_bias (a buffer in the checkpoint)."""
ROUTER_BIAS = ("gpt_oss",)
"""Routers with a bias on their logits."""
FP32_ROUTER = ("deepseek_v2", "deepseek_v3", "glm4_moe", "hunyuan_v1_moe")
"""Routers whose logits transformers computes in fp32 whatever the model dtype."""
QK_NORM_AFTER_ROPE = ("hunyuan_v1_moe",)
"""Per-head q/k norms applied after RoPE (everyone else: before)."""
PARTIAL_ROTARY = ("glm4_moe",)
"""Families whose transformers code rotates only partial_rotary_factor of each head (the rest passes)."""

ROUTER_NAMES = {"gpt_oss": "mlp.router", "hunyuan_v1_moe": "mlp.gate.wg"}
SHARED_NAMES = {"qwen2_moe": "mlp.shared_expert", "deepseek_v2": "mlp.shared_experts", "deepseek_v3": "mlp.shared_experts",
                "glm4_moe": "mlp.shared_experts", "hunyuan_v1_moe": "mlp.shared_mlp"}
QK_NORM_NAMES = {"hunyuan_v1_moe": ("query_layernorm", "key_layernorm")}


def router_name(model_type: str, block: str) -> str:
    """The router's module (its .weight, and .bias where it has one)."""
    return ROUTER_NAMES.get(model_type, f"{block}.gate")


def qk_norm_names(model_type: str) -> tuple[str, str]:
    return QK_NORM_NAMES.get(model_type, ("q_norm", "k_norm"))
