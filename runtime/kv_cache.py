"""KV cache: per layer and micro-batch, K and V [B, n_kv, capacity, head_dim].

Micro-batches whose index is below `num_device_micro_batches` (r_c of the policy, per whole micro-batch)
keep their cache on the device; the others live in one preallocated host buffer (pinned when CUDA is
present) that is reused by later passes when large enough. The host buffer is zeroed when allocated, not
per pass: attention reads unwritten slots under a mask, and what an earlier pass left there is finite.
"""
from __future__ import annotations

import torch

from hrm.spec import ModelSpec

from .host_memory import HostArena
from .packing import MicroBatch


def kv_elems(spec: ModelSpec, micro_batches: tuple[MicroBatch, ...]) -> int:
    """Elements of K and V of all layers for these micro-batches."""
    per_slot = 2 * spec.num_key_value_heads * spec.head_dim * spec.num_hidden_layers
    return per_slot * sum(mb.size * mb.capacity for mb in micro_batches)


class KVCache:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.spec, self.dtype, self.device = spec, dtype, device
        self._arena = HostArena(dtype, pin=device.type == "cuda")
        self._k: list[list[torch.Tensor]] = []
        self._v: list[list[torch.Tensor]] = []

    @property
    def host_bytes(self) -> int:
        return self._arena.nbytes

    def host_bytes_needed(self, micro_batches: tuple[MicroBatch, ...], num_device: int) -> int:
        """Extra host bytes `carve` would allocate (0 when the current buffer is large enough)."""
        return self._arena.extra_bytes(kv_elems(self.spec, micro_batches[num_device:]))

    def reserve(self, micro_batches: tuple[MicroBatch, ...], num_device: int) -> None:
        """Allocate the host buffer for such a pass now (a one-time cost, like loading the weights)."""
        self._arena.take(kv_elems(self.spec, micro_batches[num_device:]))

    def release(self) -> None:
        """Drop the last pass's layout (its device caches are freed; the host buffer stays)."""
        self._k, self._v = [], []

    def carve(self, micro_batches: tuple[MicroBatch, ...], num_device: int) -> None:
        """Lay out the caches of one pass; the first `num_device` micro-batches on the device."""
        s = self.spec
        host = self._arena.take(kv_elems(s, micro_batches[num_device:]))
        offset = 0
        self._k, self._v = [], []
        for _ in range(s.num_hidden_layers):
            ks, vs = [], []
            for mb in micro_batches:
                shape = (mb.size, s.num_key_value_heads, mb.capacity, s.head_dim)
                if mb.index < num_device:
                    ks.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                    vs.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
                    continue
                n = mb.size * s.num_key_value_heads * mb.capacity * s.head_dim
                ks.append(host[offset:offset + n].view(shape))
                vs.append(host[offset + n:offset + 2 * n].view(shape))
                offset += 2 * n
            self._k.append(ks)
            self._v.append(vs)

    def k(self, layer: int, mb: int) -> torch.Tensor:
        return self._k[layer][mb]

    def v(self, layer: int, mb: int) -> torch.Tensor:
        return self._v[layer][mb]


def append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
           rows: torch.Tensor | None = None) -> None:
    """Write one token per sequence: k, v [B, n_kv, d] at slots [B] of k_cache, v_cache [B, n_kv, T, d].
    rows: arange(B) on the cache's device (pass a cached one to save a kernel)."""
    if rows is None:
        rows = torch.arange(k.shape[0], device=k_cache.device)
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
