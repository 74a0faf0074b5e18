"""Requests -> micro-batches -> KV-cache slots.

Packed (the paper's Algorithm 2): sort requests by prompt length, descending; put each into the
micro-batch with the fewest tokens that still has room for a sequence; defer a request when that
micro-batch's token budget would overflow. Padded: requests in arrival order, every prompt left-padded
to the longest prompt of the pass (the paper's MTBench setting).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from hrm.policy import kv_blocks


@dataclass(frozen=True)
class Packing:
    micro_batches: tuple[tuple[int, ...], ...]   # request indices per micro-batch
    deferred: tuple[int, ...] = ()               # requests left for a later pass


def pack(prompt_lens: Sequence[int], micro_batch_size: int, max_tokens_per_micro_batch: int | None = None) -> Packing:
    """Algorithm 2: longest first into the micro-batch with the fewest tokens (ties: lowest index)."""
    n = len(prompt_lens)
    num_mb = -(-n // micro_batch_size)
    members: list[list[int]] = [[] for _ in range(num_mb)]
    tokens = [0] * num_mb
    deferred = []
    for r in sorted(range(n), key=lambda r: (-prompt_lens[r], r)):
        open_mbs = [m for m in range(num_mb) if len(members[m]) < micro_batch_size]
        m = min(open_mbs, key=lambda m: (tokens[m], m))
        if max_tokens_per_micro_batch is not None and tokens[m] + prompt_lens[r] > max_tokens_per_micro_batch:
            deferred.append(r)
            continue
        members[m].append(r)
        tokens[m] += prompt_lens[r]
    return Packing(tuple(tuple(m) for m in members if m), tuple(deferred))


def in_order(num_requests: int, micro_batch_size: int) -> Packing:
    """Consecutive requests per micro-batch (the padded mode's grouping)."""
    return Packing(tuple(tuple(range(s, min(num_requests, s + micro_batch_size)))
                         for s in range(0, num_requests, micro_batch_size)))


@dataclass(frozen=True)
class KVBlock:
    """Consecutive rows of a micro-batch that share one dense KV tensor [rows, n_kv, capacity, d]."""
    rows: slice
    capacity: int                                # KV slots per row
    prefill_len: int                             # the most slots a row of it fills at prefill

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's requests and where their tokens sit in its KV cache: blocks of consecutive rows
    [rows, n_kv, slots, d] (hrm.policy.kv_blocks; one block when every row needs the same slots).
    Sequence b holds `pads[b]` left-padding slots, then its prompt, then generated tokens."""
    index: int
    requests: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    pads: tuple[int, ...]
    capacity: int                                # KV slots of its longest sequence
    new_slots: int = 0                           # slots each sequence adds after prefill

    @property
    def size(self) -> int:
        return len(self.requests)

    @cached_property
    def blocks(self) -> tuple[KVBlock, ...]:
        caps = [n + self.new_slots for n in self.prefill_lens]
        return tuple(KVBlock(slice(a, b), cap, max(self.prefill_lens[a:b]))
                     for a, b, cap in kv_blocks(caps))

    @cached_property
    def kv_slots(self) -> int:
        """KV slots of all its sequences (one layer, K or V)."""
        return sum(b.size * b.capacity for b in self.blocks)

    # computed once per micro-batch: the runtime reads them per row and per chunk (O(size^2) otherwise)
    @cached_property
    def prefill_lens(self) -> tuple[int, ...]:
        """Slots each sequence fills at prefill (padding included)."""
        return tuple(p + n for p, n in zip(self.pads, self.prompt_lens))

    @cached_property
    def prefill_len(self) -> int:
        return max(self.prefill_lens)

    @cached_property
    def prefill_tokens(self) -> int:
        return sum(self.prefill_lens)


def layout(packing: Packing, prompt_lens: Sequence[int], max_new_tokens: int, padded: bool) -> tuple[MicroBatch, ...]:
    """Micro-batches with their cache geometry. Decode writes max_new_tokens - 1 tokens after the prefill;
    packed, each sequence's slots are its own prompt's (in blocks, hrm.policy.kv_blocks), padded the
    longest prompt's."""
    reqs = [r for mb in packing.micro_batches for r in mb]
    longest = max(prompt_lens[r] for r in reqs)
    out = []
    for j, mb in enumerate(packing.micro_batches):
        lens = tuple(int(prompt_lens[r]) for r in mb)
        pads = tuple(longest - n for n in lens) if padded else (0,) * len(lens)
        filled = max(p + n for p, n in zip(pads, lens))
        new = max(0, max_new_tokens - 1)
        out.append(MicroBatch(j, tuple(mb), lens, pads, filled + new, new))
    return tuple(out)
