"""CUDA graphs of the decode PostAttn (O-proj, residual, norm, router, routed and shared experts), one per
(layer, weight buffer, micro-batch size), so that a decode visit launches one graph instead of ~30 kernels.

The decode loop is bound by the host's launches when micro-batches are many (see benchmarks/README.md:
2.0-2.6 ms of host work per visit on the H200). A graph fixes its tensors' addresses, so each graph
reads static inputs (one [size, hidden] and one [size, q_dim] buffer per micro-batch size, copied in
before a replay) and writes its own output (copied out by the caller before the next replay of that
graph). The experts are read where they live: resident slots, or weight buffer `buffer`, whose pages the
pipeline overwrites between visits, as it does for the eager path. All graphs share one memory pool;
they replay one after another on the compute stream, so their intermediates never overlap in time.

Only the sync-free MoE paths can be captured: micro-batches up to MOE_DENSE_MAX_TOKENS (dense), or any
size where the grouped GEMM exists. Otherwise they run eagerly.
"""
from __future__ import annotations

import torch

from hrm.memory import attention_out_elems_per_token
from hrm.spec import ModelSpec

from . import model, moe
from .weights import WeightStore


class PostAttentionGraphs:
    def __init__(self, spec: ModelSpec, store: WeightStore):
        if store.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.spec, self.store, self.device = spec, store, store.device
        self.pool = torch.cuda.graph_pool_handle()
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}          # size -> (h [b, H], attn [b, q])
        self._graphs: dict[tuple[int, int, int], tuple[torch.CUDAGraph, torch.Tensor]] = {}

    def capturable(self, size: int) -> bool:
        """Micro-batches whose MoE path does not synchronise with the host."""
        groups = self.store.lookup(self.spec.first_dense_layers, 0).groups
        return moe.moe_path(size, groups, self.spec, self.device, self.store.dtype) != "sparse"

    def capture(self, keys) -> None:
        """Capture every (layer, buffer, size) of `keys` not captured yet (synchronises the device: call it
        before a pass, not inside one)."""
        for key in sorted(set(keys)):
            if key not in self._graphs and self.capturable(key[2]):
                self._graphs[key] = self._capture(*key)

    def get(self, layer: int, buffer: int, size: int):
        """(graph, h_in, attn_in, out) or None when that key was not captured."""
        entry = self._graphs.get((layer, buffer, size))
        if entry is None:
            return None
        h_in, attn_in = self._inputs[size]
        return entry[0], h_in, attn_in, entry[1]

    def __len__(self) -> int:
        return len(self._graphs)

    def _static_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if size not in self._inputs:
            s, dt = self.spec, self.store.dtype
            self._inputs[size] = (torch.zeros(size, s.hidden_size, dtype=dt, device=self.device),
                                  torch.zeros(size, attention_out_elems_per_token(s), dtype=dt, device=self.device))
        return self._inputs[size]

    def _capture(self, layer: int, buffer: int, size: int) -> tuple[torch.CUDAGraph, torch.Tensor]:
        h_in, attn_in = self._static_inputs(size)
        args = (h_in, attn_in, self.store.dense.layers[layer], self.store.lookup(layer, buffer), self.spec)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            model.post_attention(*args)      # first calls (kernel choice, workspaces) outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):   # worker idle
            out = model.post_attention(*args)                                 # [size, hidden]
        return graph, out
