"""Next-token choice: greedy, or temperature + top-p by inverse CDF with one uniform per (request, step),
drawn up front from the seed, so the sample does not depend on how requests were batched."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def uniforms(self, num_requests: int, max_new_tokens: int) -> torch.Tensor:
        """[requests, max_new_tokens] uniforms in [0, 1)."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(num_requests, max_new_tokens, generator=g, dtype=torch.float64)


def sample(logits: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor | None) -> torch.Tensor:
    """logits [B, vocab], uniforms [B] (ignored when greedy) -> token ids [B]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    p, ids = probs.sort(dim=-1, descending=True)                           # [B, vocab]
    cum = p.cumsum(dim=-1)
    p = torch.where(cum - p < sampling.top_p, p, torch.zeros_like(p))      # keeps at least the top token
    cdf = p.cumsum(dim=-1)                                                 # [B, vocab]
    u = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # [B, 1]
    return ids.gather(-1, pick)[:, 0]
