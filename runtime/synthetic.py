"""Synthetic weights for any ModelSpec, written into a WeightStore (the same store a checkpoint fills).

Deterministic per (seed, tensor name): the values do not depend on the placement (which experts are
resident), so every policy sees the same model. Norm weights are 1, everything else ~N(0, 0.02^2).
With CUDA, values are drawn on the GPU in chunks and copied to their place (pinned host or device).
Without CUDA, tensors up to EXACT_MAX_ELEMS are drawn exactly; larger ones are tiled from one random
block at tensor- and chunk-dependent offsets (memcpy speed; `normal_` over 20 GB takes minutes).
"""
from __future__ import annotations

import sys
import zlib

import torch

from .moe import expert_elems
from .weights import WeightStore

STD = 0.02
EXACT_MAX_ELEMS = 1 << 22
BLOCK_ELEMS = 1 << 22
GPU_CHUNK_ELEMS = 1 << 25


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class _Filler:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.seed, self.dtype = seed, dtype
        self.cuda = torch.cuda.is_available()
        self._block: torch.Tensor | None = None

    def block(self) -> torch.Tensor:
        """[2 * BLOCK_ELEMS] random values (the block twice, so any window of BLOCK_ELEMS is a view)."""
        if self._block is None:
            g = torch.Generator().manual_seed(self.seed)
            b = (torch.randn(BLOCK_ELEMS, generator=g) * STD).to(self.dtype)
            self._block = torch.cat((b, b))
        return self._block

    def fill(self, dest: torch.Tensor, name: str) -> None:
        flat = dest.view(-1)                                                 # [n]
        n, s = flat.numel(), _seed(self.seed, name)
        if self.cuda:
            g = torch.Generator(device="cuda").manual_seed(s)
            for start in range(0, n, GPU_CHUNK_ELEMS):
                stop = min(n, start + GPU_CHUNK_ELEMS)
                chunk = torch.randn(stop - start, device="cuda", generator=g).mul_(STD).to(self.dtype)
                flat[start:stop].copy_(chunk)
            return
        if n <= EXACT_MAX_ELEMS:
            g = torch.Generator().manual_seed(s)
            flat.copy_(torch.randn(n, generator=g) * STD)
            return
        block = self.block()
        for c, start in enumerate(range(0, n, BLOCK_ELEMS)):
            stop = min(n, start + BLOCK_ELEMS)
            off = (s + c * 7919) % BLOCK_ELEMS
            flat[start:stop].copy_(block[off:off + stop - start])


def synthesize(store: WeightStore, seed: int = 0, progress: bool | None = None, shard=None) -> None:
    """Fill every tensor of `store` with synthetic values. shard: a runtime.parallel.Shard: each tensor is
    drawn at its whole model's shape and cut, so the shards are those of the one-rank model."""
    from tqdm import tqdm

    if shard is not None:
        return _synthesize_shard(store, seed, progress, shard)
    spec = store.spec
    filler = _Filler(seed, store.dtype)
    dense = [(name, store.target(name)) for name in store.dense_names()]
    experts = [(layer, e) for layer in range(spec.first_dense_layers, spec.num_hidden_layers)
               for e in range(spec.num_experts)]
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(dense) + len(experts), desc="synthesising weights", disable=not show) as bar:
        for name, t in dense:
            if name.endswith("norm"):
                t.fill_(1.0)
            else:
                filler.fill(t, name)
            bar.update()
        scratch = (torch.empty(expert_elems(spec), dtype=store.dtype, device=store.device)
                   if store.layout else None)          # quantized: each expert filled in bf16, then stored
        for layer, e in experts:
            if scratch is None:
                filler.fill(store.at_rest_flat(layer, e), f"layers.{layer}.experts.{e}")
            else:
                filler.fill(scratch, f"layers.{layer}.experts.{e}")
                store.put_expert(layer, e, scratch)
            bar.update()
    if filler.cuda:
        torch.cuda.synchronize()


def _synthesize_shard(store: WeightStore, seed: int, progress: bool | None, shard) -> None:
    from dataclasses import fields

    from tqdm import tqdm

    from .moe import expert_view
    from .weights import weight_shapes

    whole, filler = shard.full, _Filler(seed, store.dtype)
    shapes = weight_shapes(whole)
    experts = [(layer, e) for layer in range(whole.first_dense_layers, whole.num_hidden_layers)
               for e in range(whole.num_experts)]
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(store.dense_names()) + len(experts), desc="synthesising weights", disable=not show) as bar:
        for name in store.dense_names():
            t = torch.empty(shapes[name], dtype=store.dtype)
            t.fill_(1.0) if name.endswith("norm") else filler.fill(t, name)
            store.target(name).copy_(shard.cut(name, t))
            bar.update()
        flat = torch.empty(expert_elems(whole), dtype=store.dtype)
        for layer, e in experts:
            filler.fill(flat, f"layers.{layer}.experts.{e}")
            parts = expert_view(flat, whole)
            for f in fields(parts):
                if getattr(parts, f.name) is not None:
                    name = f"layers.{layer}.experts.{e}.{f.name}"
                    store.target(name).copy_(shard.cut(name, getattr(parts, f.name)))
            bar.update()
    store.seal()
