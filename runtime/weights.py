"""Weight store: where every tensor of the model lives, and the page table the MoE reads experts through.

  device:  dense (non-expert) weights | resident experts [L_moe, r, X] | double buffer [2, E - r, X]
  host:    offloaded experts [L_moe, E - r, X] (pinned when CUDA is present), split per layer into pages
L_moe = spec.num_moe_layers: the leading dense layers (first_dense_layers) hold no experts (their lookups are
None and their pages none); methods take the model's layer index.
X = spec.expert_params elements (one expert stored flat as gate | up | down | its biases, where the family has
them); with experts in a
quantized format (spec.dtypes.expert_format) X is one expert's bytes (runtime.quant.ExpertLayout), the
stores are uint8, and the MoE reads each layer through a device workspace [E, 3 I H] in the compute dtype
that the layer's experts are dequantized into (runtime.quant.DequantTable). The first
r = policy.resident_experts(E) experts of every layer are resident (as the artifact). A layer's streamed
part is split into one page per micro-batch (decode copies one after each micro-batch's transfer; prefill
copies finer pieces, PageTable.pieces); pages of layer g land in buffer g % 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hrm.formats import expert_format
from hrm.spec import ModelSpec

from .host_memory import empty_host
from .model import DenseWeights, dense_weight_shapes, dense_weights_from
from .moe import ExpertLookup, ExpertTable, ExpertWeights, expert_elems, expert_view
from .quant import DequantTable, DequantWorkspace, ExpertLayout, dequantize_experts

EXPERT_PARTS = ("gate", "up", "down")
EXPERT_BIAS_PARTS = ("gate_bias", "up_bias", "down_bias")
PAGE_ALIGN_ELEMS = 256


@dataclass(frozen=True)
class Page:
    index: int
    start: int          # element offset in one layer's streamed part (flat)
    stop: int

    @property
    def elems(self) -> int:
        return self.stop - self.start


def split_span(total: int, n: int) -> tuple[Page, ...]:
    """[0, total) elements in at most n consecutive pages of equal size (a multiple of PAGE_ALIGN_ELEMS,
    the last one shorter); none where total is 0."""
    if not total:
        return ()
    n = max(1, min(n, -(-total // PAGE_ALIGN_ELEMS)))
    step = -(-total // n // PAGE_ALIGN_ELEMS) * PAGE_ALIGN_ELEMS
    bounds = [min(total, j * step) for j in range(n)] + [total]
    return tuple(Page(j, bounds[j], bounds[j + 1]) for j in range(n) if bounds[j] < bounds[j + 1])


@dataclass(frozen=True)
class PageTable:
    """Expert id -> slot, and the split of one layer's streamed part into pages (the same for every layer)."""
    num_experts: int
    resident_ids: tuple[int, ...]          # slot s of the resident store holds resident_ids[s]
    streamed_ids: tuple[int, ...]          # slot s of a GPU buffer holds streamed_ids[s]
    pages: tuple[Page, ...]
    expert_elems: int

    @classmethod
    def build(cls, num_experts: int, num_resident: int, num_pages: int, expert_elems: int) -> "PageTable":
        if not 0 <= num_resident <= num_experts:
            raise ValueError(f"num_resident={num_resident} outside [0, {num_experts}]")
        streamed = tuple(range(num_resident, num_experts))
        pages = split_span(len(streamed) * expert_elems, num_pages)
        return cls(num_experts, tuple(range(num_resident)), streamed, pages, expert_elems)

    def pieces(self, n: int, min_elems: int = 0) -> tuple[Page, ...]:
        """The layer's streamed part cut into at most n pieces of at least min_elems elements (the last
        may be shorter): finer transfers than the pages, for a pass that interleaves them with others."""
        total = self.streamed_elems
        most = max(1, total // min_elems) if min_elems else n
        return split_span(total, min(n, most))

    @property
    def num_resident(self) -> int:
        return len(self.resident_ids)

    @property
    def streamed_elems(self) -> int:
        return len(self.streamed_ids) * self.expert_elems

    def slot(self, expert: int) -> tuple[bool, int]:
        """(resident?, slot index) of an expert."""
        if expert in self.resident_ids:
            return True, self.resident_ids.index(expert)
        return False, self.streamed_ids.index(expert)


QKV_GROUPS = (("q_proj", "k_proj", "v_proj"), ("q_bias", "k_bias", "v_bias"))


def _allocate_dense(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """One tensor per name; q|k|v projections (and biases) of a layer adjacent in one allocation, so that
    model.fused_qkv can read them as one [q_dim + 2 kv_dim, hidden] matrix without a copy."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name in out:
            continue
        prefix, _, last = name.rpartition(".")
        group = next((g for g in QKV_GROUPS if last == g[0]), None)
        names = [f"{prefix}.{n}" for n in group] if group else []
        if group and all(n in shapes for n in names):
            sizes = [math.prod(shapes[n]) for n in names]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            for n, part in zip(names, flat.split(sizes)):
                out[n] = part.view(shapes[n])
            continue
        out[name] = torch.empty(shape, dtype=dtype, device=device)
    return {name: out[name] for name in shapes}


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name a loader must fill (dense names, then `layers.L.experts.E.{gate,up,down}`) -> shape."""
    shapes = dense_weight_shapes(spec)
    i, h = spec.moe_intermediate_size, spec.hidden_size
    part_shape = {"gate": (i, h), "up": (i, h), "down": (h, i), "gate_bias": (i,), "up_bias": (i,), "down_bias": (h,)}
    parts = EXPERT_PARTS + (EXPERT_BIAS_PARTS if expert_elems(spec) > 3 * i * h else ())
    for layer in range(spec.first_dense_layers, spec.num_hidden_layers):
        for e in range(spec.num_experts):
            for part in parts:
                shapes[f"layers.{layer}.experts.{e}.{part}"] = part_shape[part]
    return shapes


class WeightStore:
    """Allocates every tensor in its final place; loaders fill them through `target(name)`."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, num_resident: int,
                 num_pages: int = 1):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        fmt = spec.dtypes.expert_format
        self.layout = ExpertLayout.of(spec, expert_format(fmt)) if fmt else None
        L = spec.num_moe_layers
        self.first_moe = spec.first_dense_layers
        x, stored = (self.layout.nbytes, torch.uint8) if self.layout else (expert_elems(spec), dtype)
        self.page_table = PageTable.build(spec.num_experts, num_resident, num_pages, x)
        r, s = self.page_table.num_resident, len(self.page_table.streamed_ids)
        self._dense = _allocate_dense(dense_weight_shapes(spec), dtype, self.device)
        self.dense: DenseWeights = dense_weights_from(self._dense, spec)
        self.resident = torch.empty((L, r, x), dtype=stored, device=self.device)      # [L, r, X]
        self.offloaded = empty_host((L, s, x), stored, pin=self.device.type == "cuda")  # [L, E - r, X]
        self.buffers = torch.empty((2, s, x), dtype=stored, device=self.device)       # [2, E - r, X]
        self.workspace = (DequantWorkspace(spec, dtype, self.device) if self.layout else None)  # [E, 3 I H]
        self._pending: tuple[str, torch.Tensor] | None = None      # an expert matrix a loader is filling
        self._lookups = [[self._buffer_lookup(layer, b) for b in (0, 1)] if layer >= self.first_moe else [None, None]
                         for layer in range(spec.num_hidden_layers)]

    # ---- sizes (the memory account's parts, from the tensors) -------------------------------------
    def allocated_bytes(self) -> dict:
        """Device bytes by the account's parts."""
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {"non_expert_weights": sum(nbytes(t) for t in self._dense.values()),
                "resident_experts": nbytes(self.resident), "expert_double_buffer": nbytes(self.buffers),
                "expert_dequant": nbytes(self.workspace.tensor) if self.workspace else 0}

    @property
    def offloaded_bytes(self) -> int:
        return self.offloaded.numel() * self.offloaded.element_size()

    @property
    def streamed_bytes_per_layer(self) -> int:
        return self.page_table.streamed_elems * self.offloaded.element_size()

    # ---- loading --------------------------------------------------------------------------------
    def dense_names(self) -> list[str]:
        return list(self._dense)

    def target(self, name: str) -> torch.Tensor:
        """The tensor (a view into its final place) that weight `name` is copied into. With quantized
        experts, an expert matrix's target is a scratch tensor in the compute dtype, quantized into its
        place at the next call for another name or at `seal()`."""
        if self._pending is not None and self._pending[0] != name:
            self._flush()
        if ".experts." in name:
            _, layer, _, e, part = name.split(".")
            if self.layout is None:
                return getattr(self.at_rest(int(layer))(int(e)), part)
            if self._pending is None:
                m = self.layout.matrix(part)
                self._pending = (name, torch.empty(m.out_features, m.in_features, dtype=self.dtype))
            return self._pending[1]
        return self._dense[name]

    def seal(self) -> None:
        """The end of loading: the last expert matrix a loader filled is quantized into its place."""
        if self._pending is not None:
            self._flush()

    def put_expert(self, layer: int, expert: int, flat: torch.Tensor) -> None:
        """Store one expert given flat in the compute dtype [3 I H] (gate | up | down), quantized where the
        store's format is."""
        dest = self.at_rest_flat(layer, expert)
        if self.layout is None:
            dest.copy_(flat)
            return
        for m in self.layout.matrices:
            w = flat[m.elems_at:m.elems_at + m.out_features * m.in_features].view(m.out_features, m.in_features)
            self.layout.store_matrix(dest, m, w.to(self.device))

    def _flush(self) -> None:
        """Quantize the pending matrix (on the device, which is faster) into its expert's bytes."""
        name, w = self._pending
        self._pending = None
        _, layer, _, e, part = name.split(".")
        self.layout.store_matrix(self.at_rest_flat(int(layer), int(e)), self.layout.matrix(part), w.to(self.device))

    def at_rest_flat(self, layer: int, expert: int) -> torch.Tensor:
        """The permanent copy of one expert [X]: resident on the device or offloaded on the host."""
        resident, slot = self.page_table.slot(expert)
        m = layer - self.first_moe
        return self.resident[m, slot] if resident else self.offloaded[m, slot]

    # ---- expert lookups -------------------------------------------------------------------------
    def at_rest(self, layer: int) -> ExpertLookup:
        """Experts read from where they rest (the reference model's view; quantized ones dequantized).
        Host-resident experts are copied to the device when the device is not the CPU. None for a dense layer."""
        if layer < self.first_moe:
            return None
        if self.layout is None:
            return lambda e: expert_view(self.at_rest_flat(layer, e).to(self.device), self.spec)

        def dequantized(e: int) -> ExpertWeights:
            flat = self.at_rest_flat(layer, e).to(self.device)[None]                  # [1, bytes]
            out = torch.empty(1, expert_elems(self.spec), dtype=self.dtype, device=self.device)
            return expert_view(dequantize_experts(flat, self.layout, out)[0], self.spec)
        return dequantized

    def lookup(self, layer: int, buffer: int) -> ExpertLookup:
        """Experts as the pipeline reads them: resident slots, or `buffer` after the layer's pages landed (None
        for a dense layer)."""
        return self._lookups[layer][buffer]

    def _buffer_lookup(self, layer: int, buffer: int) -> ExpertTable | DequantTable:
        pt = self.page_table
        m = layer - self.first_moe
        stores = tuple(([(pt.resident_ids[0], self.resident[m])] if pt.resident_ids else [])
                       + ([(pt.streamed_ids[0], self.buffers[buffer])] if pt.streamed_ids else []))
        if self.layout is not None:
            return DequantTable(stores, self.layout, self.workspace)
        views: list[ExpertWeights] = []
        for e in range(self.spec.num_experts):
            resident, slot = pt.slot(e)
            flat = self.resident[m, slot] if resident else self.buffers[buffer, slot]
            views.append(expert_view(flat, self.spec))
        return ExpertTable(views, stores)

    # ---- paging ---------------------------------------------------------------------------------
    def page_source(self, layer: int, page: Page) -> torch.Tensor:
        """Host view [page elems] of one page of a layer's streamed part."""
        return self.offloaded[layer - self.first_moe].view(-1)[page.start:page.stop]

    def page_destination(self, buffer: int, page: Page) -> torch.Tensor:
        """Device view [page elems] the page lands in."""
        return self.buffers[buffer].view(-1)[page.start:page.stop]

    def copy_page(self, layer: int, buffer: int, page: Page) -> None:
        """Enqueue one page host -> device on the current stream (a dense layer has none)."""
        if layer < self.first_moe:
            return
        self.page_destination(buffer, page).copy_(self.page_source(layer, page), non_blocking=True)

