"""Rotary position embeddings as transformers computes them: the inverse frequencies of each RoPE type
(hrm.spec.ROPE_TYPES) and the cos / sin tables the layers multiply by.

Frequencies are computed in float32 in transformers' order of operations; cos and sin are taken in
float32, scaled by the type's attention factor (YaRN) and rounded once to the model dtype.
"""
from __future__ import annotations

import math

import torch

from hrm.spec import ROPE_TYPES, ModelSpec

from .families import PARTIAL_ROTARY


def rope_problem(spec: ModelSpec) -> str | None:
    """Why the runtime cannot compute this spec's RoPE exactly, or None."""
    rope = spec.rope_parameters
    if rope is None:
        return None
    if rope.rope_type not in ROPE_TYPES:
        return f"rope_parameters.rope_type {rope.rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
    if rope.partial_rotary_factor != 1.0 and spec.model_type not in PARTIAL_ROTARY:
        return (f"rope_parameters.partial_rotary_factor {rope.partial_rotary_factor} "
                f"(transformers' {spec.model_type} rotates the whole head)")
    return None


def _base_exponents(dim: int, device) -> torch.Tensor:
    """[dim / 2] float32: 0, 2, 4, ... over dim, the exponents of theta."""
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def inv_freq(spec: ModelSpec, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] float32, attention factor) of the spec's RoPE.

    dynamic grows the base only for sequences longer than max_position_embeddings; the engine refuses
    those, so within it dynamic is plain RoPE, exactly as transformers computes it there."""
    d, theta, rope = spec.rotary_dim, spec.rope_theta, spec.rope_parameters
    kind = "default" if rope is None else rope.rope_type
    if kind == "yarn":
        return _yarn(d, theta, rope, device), rope.attention_factor
    freq = 1.0 / (theta ** _base_exponents(d, device))
    if kind == "linear":
        freq /= rope.factor
    elif kind == "llama3":
        freq = _llama3(freq, rope)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"{spec.name}: runtime does not support {rope_problem(spec)}")
    return freq, 1.0


def _llama3(freq: torch.Tensor, rope) -> torch.Tensor:
    """Llama 3's frequency-dependent scaling: long wavelengths divided by factor, short ones kept, a
    smooth blend between."""
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_wavelen, freq / rope.factor, freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, rope, device) -> torch.Tensor:
    """YaRN: interpolated frequencies below the correction range, extrapolated above, a linear ramp
    across it."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                         # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    keep = 1 - ramp                                           # share of the extrapolated frequency
    return interpolation * (1 - keep) + extrapolation * keep


def rope_cos_sin(positions: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [tokens, rotary_dim] in `dtype` for integer positions [tokens]."""
    freq, attention_factor = inv_freq(spec, positions.device)
    freqs = positions.to(torch.float32)[:, None] * freq[None, :]          # [tokens, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                # [tokens, d]
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)
