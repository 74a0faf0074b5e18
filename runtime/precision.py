"""The accumulation dtype of the runtime's numerics."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit and fp32 models, fp64 for fp64 models."""
    return torch.promote_types(dtype, torch.float32)
