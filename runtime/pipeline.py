"""Executes one pass (N sequences in micro-batches) of prefill + decode with a policy's schedule.

cgopipe, per layer i and micro-batch j:  compute: Post(i,j) Pre(i,j+2) | d2h: QKV(i,j+2) | cpu: Attn(i,j+2) | h2d: H(i,j) W(i+1,j)

Decode tasks (MISSION.md, Algorithm 1): PreAttn (GPU: norm, QKV, RoPE) -> OffloadQKV (D2H) -> CPUAttn
(worker thread: KV append + attention) -> LoadH (H2D attention output) -> PostAttn (GPU: O-proj, norm,
router, experts through the page table; LM head + sampling after the last layer). Weight pages of the
next layer visit follow each LoadH on the same H2D stream. A "visit" is one layer of one forward
(prefill: visits 0..L-1, decode step s: visits L(s+1)..L(s+2)-1); visit v reads buffer v % 2.
Schedules: cgopipe (PIPELINE_AHEAD micro-batches ahead), s3 (CPU attention, nothing overlapped with
it), s4 (GPU attention, KV of the next micro-batch prefetched from the host), blocking (load a layer,
then compute). With `graphs` (runtime/graphs.py) the decode PostAttn replays a captured CUDA graph.
Here: the pass's setup, its weight pages, its memory and its results; prefill is runtime/prefill.py,
the decode tasks and the schedules' loops runtime/decode.py, the per-micro-batch state
runtime/pass_state.py.
Micro-batches whose KV the policy keeps on the device (r_c) attend on the device in every schedule.
Without CUDA, streams are None and events are already complete, so the same code runs sequentially.
"""
from __future__ import annotations

import torch

from hrm.memory import KV_TRANSFER_SLOTS, attention_out_elems_per_token, qkv_elems_per_token
from hrm.policy import Policy
from hrm.schedules import SCHEDULES
from hrm.spec import ModelSpec

from .attention import layer_attention
from .cpu_attention import AttentionWorker
from .decode import DecodePass
from .host_memory import HostArena, empty_host
from .kv_cache import KVCache, transfer_units
from .measure import Recorder
from .model import fused_qkv, signed_sin
from .packing import MicroBatch
from .pass_state import MicroBatchState, Streams
from .prefill import PrefillPass, prefill_chunks
from .rope import rope_cos_sin
from .sampling import Sampling
from .weights import Page, WeightStore


class Pipeline(PrefillPass, DecodePass):
    def __init__(self, spec: ModelSpec, policy: Policy, store: WeightStore, kv: KVCache,
                 micro_batches: tuple[MicroBatch, ...], num_device_kv: int, sampling: Sampling,
                 uniforms: torch.Tensor, prompts: list[list[int]], max_new_tokens: int,
                 recorder: Recorder, worker: AttentionWorker, graphs=None, staging: HostArena | None = None,
                 kv_transfer: HostArena | None = None, stop_token_ids=()):
        self.spec, self.policy, self.store, self.kv = spec, policy, store, kv
        self.mbs, self.sampling, self.rec, self.worker = micro_batches, sampling, recorder, worker
        self.graphs = graphs                       # runtime.graphs.PostAttentionGraphs, or None (eager)
        self.prompts, self.max_new = prompts, max_new_tokens
        self.uniforms_host = uniforms                # [N, max_new] fp64, the pass's sampling uniforms
        self.device, self.dtype = store.device, store.dtype
        self.streams = Streams(self.device)
        self.L, self.n = spec.num_hidden_layers, len(micro_batches)
        self.buffer_free = [None, None]            # event: last PostAttn of the visit that used buffer b
        self.pages_done: dict[int, object] = {}    # visit -> event after its last page
        self.state = [self._mb_state(mb, mb.index < num_device_kv, uniforms) for mb in micro_batches]
        # early stop: a sequence has ended once it samples a stop token; per column of generated tokens,
        # whether every sequence has, copied to the host without waiting (decode checks a column two steps
        # behind, so the check never stalls the pipeline)
        self.stop_ids = (torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self.device)
                         if stop_token_ids else None)
        self.columns = max(1, max_new_tokens)      # columns of generated tokens the pass returns
        self.ended_dev = torch.ones(self.columns, dtype=torch.bool, device=self.device)   # [column]
        self.ended_host = empty_host((self.columns,), torch.bool, self.streams.cuda).fill_(False)
        self.ended_events: list[object] = [None] * self.columns
        self.qkv = [fused_qkv(layer.attn) for layer in store.dense.layers]   # [q|k|v, hidden] views or None
        # per layer how it attends where the plain kernels do not (attention.LayerAttention, or None): on the
        # device (prefill, device attention) and on the host (CPU attention), each with its sinks there
        sinks = [getattr(layer.attn, "sinks", None) for layer in store.dense.layers]
        self.attention_dev = [layer_attention(spec, i, x) for i, x in enumerate(sinks)]
        self.attention_host = [layer_attention(spec, i, None if x is None else x.cpu()) for i, x in enumerate(sinks)]
        # prefill inputs per chunk and their hidden states' host staging between layers, laid out before
        # the pass like the caches (staging from `staging`, reused across passes, when given)
        self.chunks = [(m, rows, self._prefill_inputs(m, rows)) for m in self.state for rows in prefill_chunks(m.mb)]
        sizes = [x["tokens"].shape[0] * spec.hidden_size for _, _, x in self.chunks]
        flat = (staging.take(sum(sizes)) if staging is not None
                else empty_host((sum(sizes),), self.dtype, self.streams.cuda))
        self.hidden = [v.view(-1, spec.hidden_size) for v in torch.split(flat, sizes)]   # [tokens, hidden] each
        # prefill KV goes to the host through KV_TRANSFER_SLOTS pinned slots of the largest chunk's KV (k then
        # v; MLA's latent alone)
        slot = transfer_units(spec, self.dtype, max(len(rows) * m.mb.prefill_len for m, rows, _ in self.chunks))
        ring = (kv_transfer.take(KV_TRANSFER_SLOTS * slot) if kv_transfer is not None
                else empty_host((KV_TRANSFER_SLOTS * slot,), torch.uint8 if kv.format else self.dtype,
                                self.streams.cuda))
        self.kv_slots = [ring[i * slot:(i + 1) * slot] for i in range(KV_TRANSFER_SLOTS)]
        self.kv_slot_writes: list[object] = [None] * KV_TRANSFER_SLOTS    # the worker's copy out of each slot
        self._kv_slot_next = 0
        # GPU attention over host KV: the schedule's device copies of one micro-batch's KV layer, allocated
        # once at the largest micro-batch's size (the account's kv_stream_buffer), never per visit
        host_kv = [j for j, m in enumerate(self.state) if not m.kv_on_device]
        elems = max((sum(kc.numel() + (0 if vc.data_ptr() == kc.data_ptr() else vc.numel()) for _, kc, vc in kv.blocks(0, j))
                     for j in host_kv), default=0)
        buffers = SCHEDULES[policy.schedule].kv_stream_buffers if policy.attention_on_gpu and elems else 0
        self.kv_stream = [torch.empty(elems, dtype=self.dtype, device=self.device) for _ in range(buffers)]

    # ---- setup -----------------------------------------------------------------------------------
    def _mb_state(self, mb: MicroBatch, kv_on_device: bool, uniforms: torch.Tensor) -> MicroBatchState:
        s, dev, b = self.spec, self.device, mb.size
        qkv, attn = qkv_elems_per_token(s), attention_out_elems_per_token(s)
        pads = torch.tensor(mb.pads)
        lens = torch.tensor(mb.prompt_lens)
        pin = self.streams.cuda
        positions = (lens[None, :] + torch.arange(max(1, self.max_new))[:, None]).to(dev)  # [max_new, B]
        cos, sin = rope_cos_sin(positions.reshape(-1), s, self.dtype)                    # [max_new * B, d]
        rope = tuple(x.view(-1, b, s.rotary_dim) for x in (cos, sin, signed_sin(sin)))
        m = MicroBatchState(mb, kv_on_device,
                tokens=torch.zeros(b, dtype=torch.long, device=dev),
                out=torch.zeros(b, self.max_new, dtype=torch.long, device=dev),
                uniforms=uniforms[list(mb.requests)].to(dev),
                base_slot=(pads + lens).to(dev), base_slot_host=pads + lens,
                pads=pads.to(dev), pads_host=pads, prompt_lens=lens.to(dev),
                qkv_dev=torch.empty(b, qkv, dtype=self.dtype, device=dev),
                qkv_host=empty_host((b, qkv), self.dtype, pin),
                attn_dev=torch.empty(b, attn, dtype=self.dtype, device=dev),
                attn_host=empty_host((b, attn), self.dtype, pin),
                rows=torch.arange(b, device=dev), rows_host=torch.arange(b), rope=rope,
                done=torch.zeros(b, dtype=torch.bool, device=dev))
        m.qkv_dev_parts, m.qkv_host_parts = self._split_qkv(m.qkv_dev), self._split_qkv(m.qkv_host)
        return m

    def _layer(self, visit: int) -> int:
        return visit % self.L

    def _label(self, visit: int, j: int) -> str:
        return f"v{visit} L{self._layer(visit)} mb{j}"

    # ---- weight pages ----------------------------------------------------------------------------
    def _pages_for(self, j: int) -> tuple[Page, ...]:
        """Pages that follow micro-batch j's transfer: the layer's pages spread over the micro-batches."""
        pages = self.store.page_table.pages
        return pages[j * len(pages) // self.n:(j + 1) * len(pages) // self.n]

    def load_pages(self, visit: int, pages: tuple[Page, ...], stream=None) -> None:
        """Enqueue pages of `visit` into buffer visit % 2 (after that buffer's previous visit finished)."""
        if not pages or visit >= self.num_visits:
            return
        st = self.streams
        stream = stream or st.h2d
        buf = visit % 2
        st.wait(stream, self.buffer_free[buf])
        with st.use(stream), self.rec.gpu("h2d_weights", stream, f"v{visit} p{pages[0].index}-{pages[-1].index}"):
            for page in pages:
                self.store.copy_page(self._layer(visit), buf, page)
            self.pages_done[visit] = st.record(stream)

    def _wait_pages(self, visit: int) -> None:
        if self.store.page_table.pages:
            self.streams.wait(self.streams.compute, self.pages_done.get(visit))

    def _split_qkv(self, qkv: torch.Tensor):
        """[B, (n_q + 2 n_kv) d] -> q [B, n_q, d], k, v [B, n_kv, d]; MLA: [B, (heads + 1) e] -> q [B, heads, e],
        the latent k [B, 1, e] and v, its first kv_lora_rank elements."""
        s, d = self.spec, self.spec.head_dim
        if s.attention == "mla":
            e, n = s.attended_kv_elems_per_token_layer, s.num_attention_heads
            k = qkv[:, n * e:].view(qkv.shape[0], 1, e)
            return qkv[:, :n * e].view(qkv.shape[0], n, e), k, k[..., :s.kv_lora_rank]
        nq, nkv = s.num_attention_heads * d, s.num_key_value_heads * d
        b = qkv.shape[0]
        return (qkv[:, :nq].view(b, -1, d), qkv[:, nq:nq + nkv].view(b, -1, d),
                qkv[:, nq + nkv:].view(b, -1, d))

    # ---- memory ----------------------------------------------------------------------------------
    def allocated_bytes(self) -> dict:
        """Bytes of the pass's own tensors by the memory account's parts: device state of the sequences
        (with the decode masks built so far), prefill inputs, pinned q|k|v and attention buffers, and the
        host state of the sequences."""
        def nbytes(x) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (tuple, list)):
                return sum(nbytes(v) for v in x)
            return 0
        dev = ("tokens", "out", "uniforms", "base_slot", "pads", "prompt_lens", "qkv_dev", "attn_dev", "rows", "done",
               "rope", "h")
        gpu_state = sum(nbytes(getattr(m, f)) for m in self.state for f in dev) + nbytes(self.ended_dev)
        gpu_state += sum(nbytes(m.step_dev[1:]) for m in self.state if m.step_dev is not None)
        host_state = nbytes(self.uniforms_host) + nbytes(self.ended_host) + sum(
            nbytes((m.pads_host, m.base_slot_host, m.rows_host)) + (nbytes(m.step_host[1:]) if m.step_host else 0)
            for m in self.state)
        inputs = sum(nbytes((x["tokens"], x["cos"], x["sin"], x["last"], [g[:2] for g in x["groups"]]))
                     for _, _, x in self.chunks)
        return {"gpu_pass_state": gpu_state, "prefill_inputs": inputs, "host_pass_state": host_state,
                "kv_stream_buffer": nbytes(self.kv_stream),
                "io_buffers": sum(nbytes((m.qkv_host, m.attn_host)) for m in self.state)}

    # ---- results ---------------------------------------------------------------------------------
    def tokens(self) -> dict[int, list[int]]:
        """Request index -> generated tokens (synchronises)."""
        out: dict[int, list[int]] = {}
        for m in self.state:
            rows = m.out[:, :self.columns].cpu().tolist()
            for r, row in zip(m.mb.requests, rows):
                out[r] = row
        return out
