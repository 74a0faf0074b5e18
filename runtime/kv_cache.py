"""KV cache: per layer and micro-batch, K and V in blocks of consecutive rows, [rows, n_kv, slots, head_dim]
each (packing.MicroBatch.blocks: one block unless the packed mode's sequences differ in length).

Micro-batches whose index is below `num_device_micro_batches` (r_c of the policy, per whole micro-batch)
keep their cache on the device; the others live in one preallocated host buffer (pinned when CUDA is
present) that is reused by later passes when large enough. The host buffer is zeroed when allocated, not
per pass: attention reads unwritten slots under a mask, and what an earlier pass left there is finite.

In a scaled 8-bit format (spec.dtypes.kv_format: int8 or fp8, hrm.formats.KVFormat) a block's k and v are
cpu_attention.QuantKV: values [rows, n_kv, slots, d] and one fp32 scale per slot and kv head [rows, n_kv,
slots], all carved from one byte buffer (per block: K values, V values, K scales, V scales). Tokens are
quantized where they are written: `append` in decode, the prefill's copy into the host cache
(quantized on the GPU, so the D2H carries the stored bytes: `transfer_views`). Such a cache lives on the host only (CPU
attention over host KV): the engine refuses device-resident KV and GPU attention with it.
"""
from __future__ import annotations

import torch

from hrm.formats import kv_format
from hrm.spec import ModelSpec

from .cpu_attention import STORAGE_DTYPES, QuantKV, quantize_kv
from .host_memory import HostArena
from .packing import MicroBatch


def kv_elems(spec: ModelSpec, micro_batches: tuple[MicroBatch, ...]) -> int:
    """Elements of K and V of all layers for these micro-batches."""
    per_slot = 2 * spec.num_key_value_heads * spec.head_dim * spec.num_hidden_layers
    return per_slot * sum(mb.kv_slots for mb in micro_batches)


Block = tuple  # (KVBlock, k [rows, n_kv, slots, d], v [rows, n_kv, slots, d])


def check_kv_format(spec: ModelSpec) -> None:
    """Refuse a scaled KV format on layers whose attention the plain kernels do not run (runtime.attention's
    variants: MLA's latent, sinks, windows, another softmax scale)."""
    if spec.dtypes.kv_format and (spec.attention != "gqa" or spec.attention_sinks or spec.sliding_window
                                  or getattr(spec, "softmax_scale", 0.0)):
        raise ValueError(f"{spec.name}: the runtime stores a {spec.dtypes.kv_format} KV cache for plain GQA "
                         "attention only (not MLA, sinks or sliding windows)")


class KVCache:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.spec, self.dtype, self.device = spec, dtype, device
        self.format = kv_format(spec.dtypes.kv_format) if spec.dtypes.kv_format else None
        check_kv_format(spec)
        self._arena = HostArena(torch.uint8 if self.format else dtype, pin=device.type == "cuda")
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

    def reserve_bytes(self, nbytes: float) -> None:
        """`reserve` by the account's kv_cache bytes (a scaled format's arena counts bytes)."""
        self.reserve(round(nbytes) if self.format else int(nbytes) // self.dtype.itemsize)

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
        if self.format:
            return self._carve_scaled(micro_batches, num_device)
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

    def _carve_scaled(self, micro_batches: tuple[MicroBatch, ...], num_device: int) -> None:
        """carve for a scaled format: per block K values, V values, K scales, V scales in the byte buffer."""
        s, fmt = self.spec, self.format
        if num_device:
            raise ValueError(f"a {fmt.name} KV cache lives on the host only (the policy keeps {num_device} "
                             "micro-batches' KV on the device)")
        d, n_kv = s.head_dim, s.num_key_value_heads
        if d % 4:
            raise ValueError(f"a {fmt.name} KV cache needs head_dim divisible by 4 (fp32 scales), got {d}")
        need = 2 * fmt.vector_bytes(d) * n_kv * s.num_hidden_layers * sum(mb.kv_slots for mb in micro_batches)
        if abs(need - self._host_numel) > 1:      # the account's bytes are floats
            raise AssertionError(f"the pass lays out {need} host KV bytes, the memory account {self._host_numel}")
        host = self._arena.take(need)
        offset = 0
        self._blocks, self._device_bytes = [], 0
        for _ in range(s.num_hidden_layers):
            per_mb = []
            for mb in micro_batches:
                blocks = []
                for block in mb.blocks:
                    shape = (block.size, n_kv, block.capacity, d)
                    n, m = block.size * n_kv * block.capacity * d * fmt.elem_bytes, block.size * n_kv * block.capacity
                    data = [host[offset + i * n:offset + (i + 1) * n].view(STORAGE_DTYPES[fmt.name]).view(shape)
                            for i in range(2)]
                    offset += 2 * n
                    scales = [host[offset + i * 4 * m:offset + (i + 1) * 4 * m].view(torch.float32).view(shape[:3])
                              for i in range(2)]
                    offset += 8 * m
                    blocks.append((block, QuantKV(data[0], scales[0]), QuantKV(data[1], scales[1])))
                per_mb.append(tuple(blocks))
            self._blocks.append(per_mb)

    def blocks(self, layer: int, mb: int) -> tuple[Block, ...]:
        """(KVBlock, k, v) of one layer and micro-batch, in row order."""
        return self._blocks[layer][mb]


def append(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
           rows: torch.Tensor | None = None) -> None:
    """Write one token per sequence: k, v [B, n_kv, d] at slots [B] of k_cache, v_cache [B, n_kv, T, d]
    (tensors, or QuantKV: the token quantized).
    rows: arange(B) on the cache's device (pass a cached one to save a kernel)."""
    if rows is None:
        rows = torch.arange(k.shape[0], device=k_cache.device)
    if isinstance(k_cache, QuantKV):             # quantized here, one scale per token and kv head
        for cache, x in ((k_cache, k), (v_cache, v)):
            qx = quantize_kv(x, cache.format)
            cache.data[rows, :, slots] = qx.data
            cache.scale[rows, :, slots] = qx.scale
        return
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v


def transfer_units(spec: ModelSpec, dtype: torch.dtype, slots: int) -> int:
    """Size of one prefill transfer slot (k and v of `slots` token slots of one layer) in the units of the
    KV transfer arena: elements of the compute dtype, or bytes for a scaled format (values and scales)."""
    if spec.dtypes.kv_format:
        return 2 * slots * spec.num_key_value_heads * kv_format(spec.dtypes.kv_format).vector_bytes(spec.head_dim)
    return slots * spec.attended_kv_elems_per_token_layer


def transfer_views(buf: torch.Tensor, shape: tuple, fmt) -> tuple[QuantKV, QuantKV]:
    """k, v QuantKV of `shape` [rows, n_kv, S, d] over the front of a byte buffer (a transfer slot): K
    values, V values, K scales, V scales."""
    n = shape[0] * shape[1] * shape[2] * shape[3] * fmt.elem_bytes
    m = 4 * shape[0] * shape[1] * shape[2]
    data = [buf[i * n:(i + 1) * n].view(STORAGE_DTYPES[fmt.name]).view(shape) for i in range(2)]
    scale = [buf[2 * n + i * m:2 * n + (i + 1) * m].view(torch.float32).view(shape[:3]) for i in range(2)]
    return QuantKV(data[0], scale[0]), QuantKV(data[1], scale[1])
