"""KV cache: per layer and micro-batch, K and V in blocks of consecutive rows, [rows, n_kv, slots, head_dim]
each (packing.MicroBatch.blocks: one block unless the packed mode's sequences differ in length).

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
    return per_slot * sum(mb.kv_slots for mb in micro_batches)


Block = tuple  # (KVBlock, k [rows, n_kv, slots, d], v [rows, n_kv, slots, d])


class KVCache:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.spec, self.dtype, self.device = spec, dtype, device
        self._arena = HostArena(dtype, pin=device.type == "cuda")
        self._blocks: list[list[tuple[Block, ...]]] = []      # [layer][micro-batch]
        self._host_numel = 0
        self._device_bytes = 0

    @property
    def host_bytes(self) -> int:
        return self._arena.nbytes

    @property
    def device_bytes(self) -> int:
        """Bytes of the device caches of the pass laid out now."""
        return self._device_bytes

    def reserve(self, numel: int) -> None:
        """Make the host buffer hold at least `numel` elements (the account's kv_cache part); it is kept
        across passes and grows only when a pass needs more."""
        self._host_numel = numel
        self._arena.take(numel)

    def release(self) -> None:
        """Drop the last pass's layout: its device caches are freed and no view of the host buffer stays,
        so the buffer can be replaced without both being held."""
        self._blocks = []
        self._device_bytes = 0

    def carve(self, micro_batches: tuple[MicroBatch, ...], num_device: int) -> None:
        """Lay out the caches of one pass in the host buffer `reserve` sized (the account's kv_cache part);
        the first `num_device` micro-batches on the device."""
        s = self.spec
        need = kv_elems(s, micro_batches[num_device:])
        if need != self._host_numel:
            raise AssertionError(f"the pass lays out {need} host KV elements, the memory account {self._host_numel}")
        host = self._arena.take(need)
        offset = 0
        self._blocks, self._device_bytes = [], 0
        for _ in range(s.num_hidden_layers):
            per_mb = []
            for mb in micro_batches:
                blocks = []
                for block in mb.blocks:
                    shape = (block.size, s.num_key_value_heads, block.capacity, s.head_dim)
                    if mb.index < num_device:
                        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
                        self._device_bytes += 2 * k.numel() * k.element_size()
                    else:
                        n = block.size * s.num_key_value_heads * block.capacity * s.head_dim
                        k = host[offset:offset + n].view(shape)
                        v = host[offset + n:offset + 2 * n].view(shape)
                        offset += 2 * n
                    blocks.append((block, k, v))
                per_mb.append(tuple(blocks))
            self._blocks.append(per_mb)

    def blocks(self, layer: int, mb: int) -> tuple[Block, ...]:
        """(KVBlock, k, v) of one layer and micro-batch, in row order."""
        return self._blocks[layer][mb]


def append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
           rows: torch.Tensor | None = None) -> None:
    """Write one token per sequence: k, v [B, n_kv, d] at slots [B] of k_cache, v_cache [B, n_kv, T, d].
    rows: arange(B) on the cache's device (pass a cached one to save a kernel)."""
    if rows is None:
        rows = torch.arange(k.shape[0], device=k_cache.device)
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
