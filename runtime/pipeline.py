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
Micro-batches whose KV the policy keeps on the device (r_c) attend on the device in every schedule.
Without CUDA, streams are None and events are already complete, so the same code runs sequentially.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hrm.memory import KV_TRANSFER_SLOTS
from hrm.policy import PREFILL_CHUNK_TOKENS, Policy
from hrm.spec import ModelSpec

from .cpu_attention import AttentionWorker, attention_mask, decode_attention
from .host_memory import HostArena, empty_host
from .kv_cache import KVCache, append
from .measure import Recorder
from .model import (causal_attention, final_logits, fused_qkv, post_attention, pre_attention,
                    pre_attention_packed, signed_sin)
from .packing import MicroBatch
from .rope import rope_cos_sin
from .sampling import Sampling, sample
from .weights import Page, WeightStore


PIPELINE_AHEAD = 2
"""CGOPipe issues micro-batch j + PIPELINE_AHEAD's PreAttn (and so its CPU attention) before j's PostAttn,
as the paper's Algorithm 1 (two ahead). Three ahead was measured on the H200 (Mixtral, all 32 layers,
N 732, mu 23; benchmarks/results/h200/full_model_32_layers*): decode 64.6 s against 60.3 s with two."""


DECODE_LOOPS: dict = {}
"""Schedule name (hrm.schedules) -> the decode loop that runs it: a function of the Pipeline."""


def decode_loop(name: str):
    """Register a decode loop under a schedule's name."""
    def register(fn):
        DECODE_LOOPS[name] = fn
        return fn
    return register


class _Done:
    """The event of work that already ran (no CUDA)."""

    def synchronize(self) -> None:
        pass


DONE = _Done()


def prefill_chunks(mb: MicroBatch, max_tokens: int | None = None) -> list[range]:
    """Rows of a micro-batch in consecutive chunks of at most max_tokens (default PREFILL_CHUNK_TOKENS)
    prefill tokens, at least one sequence each."""
    max_tokens = PREFILL_CHUNK_TOKENS if max_tokens is None else max_tokens
    out, start, tokens = [], 0, 0
    for row, n in enumerate(mb.prefill_lens):
        if row > start and tokens + n > max_tokens:
            out.append(range(start, row))
            start, tokens = row, 0
        tokens += n
    out.append(range(start, mb.size))
    return out


def _copy_prefill_kv(blocks, rows: range, k: torch.Tensor, v: torch.Tensor) -> None:
    """Prefill KV of micro-batch rows `rows` (k, v [rows, n_kv, S, d], S >= every block's prefill_len) into
    the KV blocks those rows belong to."""
    for block, kc, vc in blocks:
        a, b = max(block.rows.start, rows.start), min(block.rows.stop, rows.stop)
        if a >= b:
            continue
        t, first = block.prefill_len, block.rows.start
        kc[a - first:b - first, :, :t].copy_(k[a - rows.start:b - rows.start, :, :t])
        vc[a - first:b - first, :, :t].copy_(v[a - rows.start:b - rows.start, :, :t])


def attend_blocks(blocks, masks, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """One decode step of a micro-batch over its KV blocks: this step's k, v [B, n_kv, d] appended at
    slots [B], then q [B, n_q, d] attends block by block into out [B, n_q d]. masks: per block
    [rows, 1, 1, T] (Pipeline._step_tensors); rows: arange(>= the largest block) on the cache's device."""
    for (block, kc, vc), mask in zip(blocks, masks):
        r = block.rows
        append(kc, vc, k[r], v[r], slots[r], rows[:block.size])
        out[r] = decode_attention(q[r], kc, vc, None, None, block.prefill_len + step + 1, mask=mask)


class Streams:
    """compute (the current stream), h2d (activations + weight pages), h2d_kv (s4's KV), d2h."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d, self.h2d_kv, self.d2h = (torch.cuda.Stream(device) for _ in range(3))
        else:
            self.compute = self.h2d = self.h2d_kv = self.d2h = None

    def use(self, stream):
        return torch.cuda.stream(stream) if self.cuda else nullcontext()

    def record(self, stream):
        if not self.cuda:
            return DONE
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def wait(self, stream, event) -> None:
        if self.cuda and event is not None and event is not DONE:
            stream.wait_event(event)


@dataclass
class _MB:
    """Device tensors and host buffers of one micro-batch for the pass."""
    mb: MicroBatch
    kv_on_device: bool
    tokens: torch.Tensor            # [B] device: current input token
    out: torch.Tensor               # [B, max_new] device: generated tokens
    uniforms: torch.Tensor          # [B, max_new] device (sampling)
    base_slot: torch.Tensor         # [B] device: slot of decode step 0 (pad + prompt len)
    base_slot_host: torch.Tensor    # [B] host
    pads: torch.Tensor              # [B] device: first valid slot
    pads_host: torch.Tensor         # [B] host
    prompt_lens: torch.Tensor       # [B] device
    qkv_dev: torch.Tensor           # [B, (n_q + 2 n_kv) d] device
    qkv_host: torch.Tensor          # [B, (n_q + 2 n_kv) d] host
    attn_dev: torch.Tensor          # [B, n_q d] device
    attn_host: torch.Tensor         # [B, n_q d] host
    rows: torch.Tensor              # [B] device: arange (KV append)
    rows_host: torch.Tensor         # [B] host
    rope: tuple                     # (cos, sin, signed sin) [max_new, B, d] device, per decode step
    qkv_dev_parts: tuple = ()       # q [B, n_q, d], k, v [B, n_kv, d]: views of qkv_dev
    qkv_host_parts: tuple = ()      # the same views of qkv_host (built once: the worker needs the GIL less)
    h_buf: torch.Tensor | None = None   # [B, hidden] device: where a PostAttn graph's output is copied
    h: torch.Tensor | None = None   # [B, hidden] device residual stream
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    sin_signed: torch.Tensor | None = None
    step_host: tuple | None = None  # (step, slots [B], mask [B, 1, 1, T]) host: the worker's, per step
    step_dev: tuple | None = None   # the same on the device (main thread)
    ev_pre: object = None
    ev_d2h: object = None
    ev_load_h: object = None
    ev_post: object = None
    future: object = None


class Pipeline:
    def __init__(self, spec: ModelSpec, policy: Policy, store: WeightStore, kv: KVCache,
                 micro_batches: tuple[MicroBatch, ...], num_device_kv: int, sampling: Sampling,
                 uniforms: torch.Tensor, prompts: list[list[int]], max_new_tokens: int,
                 recorder: Recorder, worker: AttentionWorker, graphs=None, staging: HostArena | None = None,
                 kv_transfer: HostArena | None = None):
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
        self.qkv = [fused_qkv(layer.attn) for layer in store.dense.layers]   # [q|k|v, hidden] views or None
        # prefill inputs per chunk and their hidden states' host staging between layers, laid out before
        # the pass like the caches (staging from `staging`, reused across passes, when given)
        self.chunks = [(m, rows, self._prefill_inputs(m, rows)) for m in self.state for rows in prefill_chunks(m.mb)]
        sizes = [x["tokens"].shape[0] * spec.hidden_size for _, _, x in self.chunks]
        flat = (staging.take(sum(sizes)) if staging is not None
                else empty_host((sum(sizes),), self.dtype, self.streams.cuda))
        self.hidden = [v.view(-1, spec.hidden_size) for v in torch.split(flat, sizes)]   # [tokens, hidden] each
        # prefill KV goes to the host through KV_TRANSFER_SLOTS pinned (k, v) slots of the largest chunk
        slot = max(len(rows) * m.mb.prefill_len for m, rows, _ in self.chunks) * spec.num_key_value_heads * spec.head_dim
        ring = (kv_transfer.take(2 * KV_TRANSFER_SLOTS * slot) if kv_transfer is not None
                else empty_host((2 * KV_TRANSFER_SLOTS * slot,), self.dtype, self.streams.cuda))
        self.kv_slots = [(ring[2 * i * slot:(2 * i + 1) * slot], ring[(2 * i + 1) * slot:(2 * i + 2) * slot])
                         for i in range(KV_TRANSFER_SLOTS)]
        self.kv_slot_writes: list[object] = [None] * KV_TRANSFER_SLOTS    # the worker's copy out of each slot
        self._kv_slot_next = 0

    # ---- setup -----------------------------------------------------------------------------------
    def _mb_state(self, mb: MicroBatch, kv_on_device: bool, uniforms: torch.Tensor) -> _MB:
        s, dev, b = self.spec, self.device, mb.size
        qkv = (s.num_attention_heads + 2 * s.num_key_value_heads) * s.head_dim
        pads = torch.tensor(mb.pads)
        lens = torch.tensor(mb.prompt_lens)
        pin = self.streams.cuda
        positions = (lens[None, :] + torch.arange(max(1, self.max_new))[:, None]).to(dev)  # [max_new, B]
        cos, sin = rope_cos_sin(positions.reshape(-1), s, self.dtype)                    # [max_new * B, d]
        rope = tuple(x.view(-1, b, s.head_dim) for x in (cos, sin, signed_sin(sin)))
        m = _MB(mb, kv_on_device,
                tokens=torch.zeros(b, dtype=torch.long, device=dev),
                out=torch.zeros(b, self.max_new, dtype=torch.long, device=dev),
                uniforms=uniforms[list(mb.requests)].to(dev),
                base_slot=(pads + lens).to(dev), base_slot_host=pads + lens,
                pads=pads.to(dev), pads_host=pads, prompt_lens=lens.to(dev),
                qkv_dev=torch.empty(b, qkv, dtype=self.dtype, device=dev),
                qkv_host=empty_host((b, qkv), self.dtype, pin),
                attn_dev=torch.empty(b, s.q_dim, dtype=self.dtype, device=dev),
                attn_host=empty_host((b, s.q_dim), self.dtype, pin),
                rows=torch.arange(b, device=dev), rows_host=torch.arange(b), rope=rope)
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

    # ---- prefill ---------------------------------------------------------------------------------
    def prefill(self) -> None:
        """All layers on the device, micro-batch by micro-batch, each in chunks of whole sequences of at
        most PREFILL_CHUNK_TOKENS tokens (the chunk, not the micro-batch, sets the activation peak);
        hidden states and KV go to the host between layers (KV to the device cache for micro-batches
        that keep it there)."""
        self.rec.phase = "prefill"
        st, spec = self.streams, self.spec
        self.load_pages(0, self.store.page_table.pages)
        chunks, hidden = self.chunks, self.hidden
        ev_hidden_d2h: list[object] = [None] * len(chunks)
        kv_writes: list[object] = []
        for visit in range(self.L):
            layer = self.store.dense.layers[visit]
            for c, (m, rows, x) in enumerate(chunks):
                j, first_of_mb = m.mb.index, rows.start == 0
                label = self._label(visit, j) + ("" if len(rows) == m.mb.size else f" r{rows.start}")
                if visit == 0:
                    h_in = None
                else:
                    st.wait(st.h2d, ev_hidden_d2h[c])
                    with st.use(st.h2d), self.rec.gpu("h2d_hidden", st.h2d, label):
                        h_in = hidden[c].to(self.device, non_blocking=True)
                        ev_h = st.record(st.h2d)
                if first_of_mb:
                    self.load_pages(visit + 1, self._pages_for(j))
                if visit > 0:
                    st.wait(st.compute, ev_h)
                if c == 0:
                    self._wait_pages(visit)
                with st.use(st.compute), self.rec.gpu("gpu_compute", st.compute, label):
                    h = self.store.dense.embed[x["tokens"]] if visit == 0 else h_in  # [tokens, hidden]
                    q, k, v = pre_attention(h, layer, spec, x["cos"], x["sin"])
                    attn = q.new_empty(q.shape[0], q.shape[1] * v.shape[2])            # [tokens, q_dim]
                    for idx, _, pad in x["groups"]:                                  # idx [G, len]
                        attn[idx] = causal_attention(q[idx], k[idx], v[idx], pad)
                    h = post_attention(h, attn, layer, self.store.lookup(visit, visit % 2), spec)
                    kpad, vpad = self._padded_kv(k, v, x, m.mb, len(rows))           # [rows, n_kv, S, d]
                    if visit == self.L - 1:
                        logits = final_logits(h[x["last"]], self.store.dense, spec)  # [rows, vocab]
                        m.tokens[rows.start:rows.stop] = sample(logits, self.sampling,
                                                                m.uniforms[rows.start:rows.stop, 0])
                        m.out[rows.start:rows.stop, 0] = m.tokens[rows.start:rows.stop]
                    ev_c = st.record(st.compute)
                if c == len(chunks) - 1:
                    self.buffer_free[visit % 2] = ev_c
                kv_writes.append(self._store_prefill_kv(visit, m, rows, kpad, vpad, ev_c, label))
                if visit < self.L - 1:
                    st.wait(st.d2h, ev_c)
                    with st.use(st.d2h), self.rec.gpu("d2h", st.d2h, label):
                        hidden[c].copy_(h, non_blocking=True)
                        ev_hidden_d2h[c] = st.record(st.d2h)
                        if st.cuda:
                            h.record_stream(st.d2h)
                if st.cuda and visit > 0:
                    h_in.record_stream(st.compute)
        for f in kv_writes:
            if f is not None:
                f.result()

    def _prefill_inputs(self, m: _MB, rows: range) -> dict:
        """Flattened prefill tokens of rows `rows` of a micro-batch (left padding as token 0), positions,
        segments (rows counted from rows.start)."""
        tokens, segments, last = [], [], []
        for r, pad in zip(m.mb.requests[rows.start:rows.stop], m.mb.pads[rows.start:rows.stop]):
            a = len(tokens)
            tokens += [0] * pad
            tokens += self.prompts[r]
            segments.append((a, len(tokens), pad))
            last.append(len(tokens) - 1)
        # position of each slot: 0 over the left padding, then 0, 1, ... over the prompt
        starts = torch.tensor([a + pad for a, _, pad in segments])                        # [rows]
        lengths = torch.tensor([b - a for a, b, _ in segments])                           # [rows]
        pos = (torch.arange(len(tokens)) - starts.repeat_interleave(lengths)).clamp_(min=0).to(self.device)
        cos, sin = rope_cos_sin(pos, self.spec, self.dtype)
        return {"tokens": torch.tensor(tokens, device=self.device), "cos": cos, "sin": sin,
                "groups": self._segment_groups(segments), "last": torch.tensor(last, device=self.device)}

    def _segment_groups(self, segments) -> list:
        """Sequences of one micro-batch grouped by (length, padding), so prefill attention and the KV
        layout take one batched call per group: [(token index [G, len], rows [G], pad)]."""
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for row, (a, e, pad) in enumerate(segments):
            groups.setdefault((e - a, pad), []).append((row, a))
        out = []
        for (length, pad), members in groups.items():
            starts = torch.tensor([a for _, a in members], device=self.device)
            idx = starts[:, None] + torch.arange(length, device=self.device)[None, :]
            out.append((idx, torch.tensor([r for r, _ in members], device=self.device), pad))
        return out

    def _padded_kv(self, k: torch.Tensor, v: torch.Tensor, x: dict, mb: MicroBatch, num_rows: int):
        """Varlen k, v [tokens, n_kv, d] of num_rows sequences -> [rows, n_kv, prefill_len, d] in the
        cache layout."""
        s = self.spec
        shape = (num_rows, mb.prefill_len, s.num_key_value_heads, s.head_dim)
        kpad = torch.zeros(shape, dtype=k.dtype, device=k.device)
        vpad = torch.zeros(shape, dtype=v.dtype, device=v.device)
        for idx, rows, _ in x["groups"]:
            length = idx.shape[1]
            kpad[rows, :length], vpad[rows, :length] = k[idx], v[idx]
        return kpad.transpose(1, 2).contiguous(), vpad.transpose(1, 2).contiguous()

    def _store_prefill_kv(self, visit: int, m: _MB, rows: range, kpad, vpad, ev_c, label: str):
        """KV of one (layer, micro-batch rows) into its cache: a device copy, or D2H then a host copy in
        the worker (which later runs that micro-batch's attention, so FIFO order keeps them consistent)."""
        st, j = self.streams, m.mb.index
        blocks = self.kv.blocks(visit, j)
        if m.kv_on_device:
            _copy_prefill_kv(blocks, rows, kpad, vpad)
            return None
        i = self._kv_slot_next
        self._kv_slot_next = (i + 1) % KV_TRANSFER_SLOTS
        if self.kv_slot_writes[i] is not None:
            self.kv_slot_writes[i].result()                                       # slot i copied out again
        k_host, v_host = (buf[:kpad.numel()].view(kpad.shape) for buf in self.kv_slots[i])  # [B, n_kv, S, d]
        st.wait(st.d2h, ev_c)
        with st.use(st.d2h), self.rec.gpu("d2h", st.d2h, label):
            k_host.copy_(kpad, non_blocking=True)
            v_host.copy_(vpad, non_blocking=True)
            ev = st.record(st.d2h)
            if st.cuda:
                kpad.record_stream(st.d2h)
                vpad.record_stream(st.d2h)

        def write() -> None:
            ev.synchronize()
            with self.rec.host("d2h", label + " kv", phase="prefill"):
                _copy_prefill_kv(blocks, rows, k_host, v_host)
        self.kv_slot_writes[i] = self.worker.submit(write)
        return self.kv_slot_writes[i]

    # ---- decode tasks ----------------------------------------------------------------------------
    def _begin_token(self, m: _MB, step: int) -> None:
        """Layer 0 of a decode step: embed the current tokens; RoPE tables for their positions."""
        m.h = self.store.dense.embed[m.tokens]                                      # [B, hidden]
        m.cos, m.sin, m.sin_signed = (x[step] for x in m.rope)                     # precomputed per pass

    def pre_attn(self, visit: int, j: int) -> None:
        st, m = self.streams, self.state[j]
        step, layer = visit // self.L - 1, self._layer(visit)
        st.wait(st.compute, m.ev_d2h)                                             # qkv_dev free again
        with st.use(st.compute), self.rec.gpu("gpu_compute", st.compute, self._label(visit, j)):
            if layer == 0:
                self._begin_token(m, step)
            pre_attention_packed(m.h, self.store.dense.layers[layer], self.spec, m.cos, m.sin, m.sin_signed,
                                 m.qkv_dev, self.qkv[layer])
            m.ev_pre = st.record(st.compute)

    def _split_qkv(self, qkv: torch.Tensor):
        """[B, (n_q + 2 n_kv) d] -> q [B, n_q, d], k, v [B, n_kv, d]."""
        s, d = self.spec, self.spec.head_dim
        nq, nkv = s.num_attention_heads * d, s.num_key_value_heads * d
        b = qkv.shape[0]
        return (qkv[:, :nq].view(b, -1, d), qkv[:, nq:nq + nkv].view(b, -1, d),
                qkv[:, nq + nkv:].view(b, -1, d))

    def _step_tensors(self, m: _MB, step: int, base_slot: torch.Tensor, pads: torch.Tensor) -> tuple:
        """(step, slots [B] of this step's token, per KV block its valid-slot mask [rows, 1, 1, T]) of a
        micro-batch: they depend on the step only, so they are built once per step and reused by every
        layer."""
        slots = base_slot + step                                                    # [B]
        return step, slots, tuple(attention_mask(pads[b.rows], slots[b.rows] + 1, b.prefill_len + step + 1)
                                  for b in m.mb.blocks)

    def offload_qkv(self, visit: int, j: int) -> None:
        st, m = self.streams, self.state[j]
        st.wait(st.d2h, m.ev_pre)
        with st.use(st.d2h), self.rec.gpu("d2h", st.d2h, self._label(visit, j)):
            m.qkv_host.copy_(m.qkv_dev, non_blocking=True)
            m.ev_d2h = st.record(st.d2h)

    def cpu_attn(self, visit: int, j: int) -> None:
        """Submit KV append + attention of (visit, j) to the worker (it waits for the D2H itself)."""
        m, layer, step = self.state[j], self._layer(visit), visit // self.L - 1
        ev_d2h, ev_prev_load = m.ev_d2h, m.ev_load_h
        blocks, label = self.kv.blocks(layer, j), self._label(visit, j)

        def task() -> None:
            ev_d2h.synchronize()
            if ev_prev_load is not None:
                ev_prev_load.synchronize()                                        # attn_host free again
            with self.rec.host("cpu_attention", label, phase="decode"):
                q, k, v = m.qkv_host_parts
                if m.step_host is None or m.step_host[0] != step:                  # once per step, not per layer
                    m.step_host = self._step_tensors(m, step, m.base_slot_host, m.pads_host)
                _, slots, masks = m.step_host
                attend_blocks(blocks, masks, step, q, k, v, slots, m.rows_host, m.attn_host)
        m.future = self.worker.submit(task)

    def load_h(self, visit: int, j: int) -> None:
        st, m = self.streams, self.state[j]
        m.future.result()
        st.wait(st.h2d, m.ev_post)                                                # attn_dev free again
        with st.use(st.h2d), self.rec.gpu("h2d_hidden", st.h2d, self._label(visit, j)):
            m.attn_dev.copy_(m.attn_host, non_blocking=True)
            m.ev_load_h = st.record(st.h2d)

    def device_attn(self, visit: int, j: int, blocks=None) -> None:
        """Append + attention on the device, over the device cache or an H2D-streamed copy of its blocks (s4)."""
        st, m, layer, step = self.streams, self.state[j], self._layer(visit), visit // self.L - 1
        blocks = self.kv.blocks(layer, j) if blocks is None else blocks
        with st.use(st.compute), self.rec.gpu("gpu_compute", st.compute, self._label(visit, j)):
            q, k, v = m.qkv_dev_parts
            if m.step_dev is None or m.step_dev[0] != step:
                m.step_dev = self._step_tensors(m, step, m.base_slot, m.pads)
            _, slots, masks = m.step_dev
            attend_blocks(blocks, masks, step, q, k, v, slots, m.rows, m.attn_dev)
            m.ev_load_h = st.record(st.compute)

    def post_attn(self, visit: int, j: int) -> None:
        st, m, layer = self.streams, self.state[j], self._layer(visit)
        st.wait(st.compute, m.ev_load_h)
        if j == 0:
            self._wait_pages(visit)
        graph = self.graphs.get(layer, visit % 2, m.mb.size) if self.graphs is not None else None
        with st.use(st.compute), self.rec.gpu("gpu_compute", st.compute, self._label(visit, j)):
            if graph is None:
                lookup = self.store.lookup(layer, visit % 2)
                m.h = post_attention(m.h, m.attn_dev, self.store.dense.layers[layer], lookup, self.spec)
            else:
                g, h_in, attn_in, out = graph
                h_in.copy_(m.h)
                attn_in.copy_(m.attn_dev)
                g.replay()
                if m.h_buf is None:
                    m.h_buf = torch.empty_like(out)
                m.h = m.h_buf.copy_(out)            # before the next replay of this graph overwrites it
            if layer == self.L - 1:
                step = visit // self.L - 1
                logits = final_logits(m.h, self.store.dense, self.spec)             # [B, vocab]
                m.tokens = sample(logits, self.sampling, m.uniforms[:, step + 1])
                m.out[:, step + 1] = m.tokens
            m.ev_post = st.record(st.compute)
            if j == self.n - 1:
                self.buffer_free[visit % 2] = m.ev_post

    def front(self, visit: int, j: int) -> None:
        """PreAttn -> attention up to its result being ready to load (D2H + CPU attention, or device)."""
        self.pre_attn(visit, j)
        if self.state[j].kv_on_device:
            self.device_attn(visit, j)
        else:
            self.offload_qkv(visit, j)
            self.cpu_attn(visit, j)

    def back(self, visit: int, j: int, pages: tuple[Page, ...]) -> None:
        """LoadH, then the next visit's pages, then PostAttn."""
        if not self.state[j].kv_on_device:
            self.load_h(visit, j)
        self.load_pages(visit + 1, pages)
        self.post_attn(visit, j)

    # ---- decode schedules ------------------------------------------------------------------------
    def graph_keys(self) -> set[tuple[int, int, int]]:
        """(layer, weight buffer, micro-batch size) of every decode PostAttn of the pass (buffer parity
        repeats every 2 L visits)."""
        visits = range(self.L, min(self.num_visits, 3 * self.L))
        return {(v % self.L, v % 2, m.mb.size) for v in visits for m in self.state}

    @property
    def num_visits(self) -> int:
        return self.L * self.max_new      # prefill + (max_new - 1) decode steps

    def decode(self) -> None:
        self.rec.phase = "decode"
        if self.max_new > 1:
            DECODE_LOOPS[self.policy.schedule](self)

    @decode_loop("cgopipe")
    def _decode_cgopipe(self) -> None:
        """Algorithm 1 over the flattened (visit, micro-batch) sequence, `ahead` tasks in front."""
        first, n = self.L, self.n
        tasks = [(v, j) for v in range(first, self.num_visits) for j in range(n)]
        ahead = min(PIPELINE_AHEAD, n)            # front(v + 1, j) must follow back(v, j)
        for t in range(min(ahead, len(tasks))):
            self.front(*tasks[t])
        for t, (visit, j) in enumerate(tasks):
            self.back(visit, j, self._pages_for(j))
            if t + ahead < len(tasks):
                self.front(*tasks[t + ahead])

    @decode_loop("s3")
    def _decode_s3(self) -> None:
        """FlexGen(c): next layer's weights loaded at the layer start; CPU attention waited for in place."""
        for visit in range(self.L, self.num_visits):
            for j in range(self.n):
                self.front(visit, j)
                self.back(visit, j, self.store.page_table.pages if j == 0 else ())

    @decode_loop("s4")
    def _decode_s4(self) -> None:
        """FlexGen: GPU attention; KV of the next micro-batch prefetched from the host on its own stream."""
        st = self.streams
        staging = [None, None]          # (k, v) device copies, double-buffered by micro-batch parity
        staged_ev = [None, None]
        used_ev = [None, None]
        order = [(v, j) for v in range(self.L, self.num_visits) for j in range(self.n)]
        appends: dict[int, object] = {}

        def prefetch(t: int) -> None:
            visit, j = order[t]
            if self.state[j].kv_on_device:
                return
            layer, b = self._layer(visit), t % 2
            if j in appends:
                appends.pop(j).result()      # host cache holds the previous step's token
            st.wait(st.h2d_kv, used_ev[b])
            with st.use(st.h2d_kv), self.rec.gpu("h2d_kv", st.h2d_kv, self._label(visit, j)):
                staging[b] = self._to_device(self.kv.blocks(layer, j), non_blocking=True)
                staged_ev[b] = st.record(st.h2d_kv)

        if order:
            prefetch(0)
        for t, (visit, j) in enumerate(order):
            if t + 1 < len(order):
                prefetch(t + 1)
            self.pre_attn(visit, j)
            m = self.state[j]
            if m.kv_on_device:
                self.device_attn(visit, j)
            else:
                b = t % 2
                st.wait(st.compute, staged_ev[b])
                self.device_attn(visit, j, staging[b])
                used_ev[b] = m.ev_load_h
                if st.cuda:
                    for _, kc, vc in staging[b]:
                        kc.record_stream(st.compute)
                        vc.record_stream(st.compute)
                self.offload_qkv(visit, j)
                appends[j] = self._append_on_host(visit, j)
            self.load_pages(visit + 1, self.store.page_table.pages if j == 0 else ())
            self.post_attn(visit, j)
        for f in appends.values():
            f.result()

    def _append_on_host(self, visit: int, j: int):
        """Worker: write the new token's k, v (offloaded with q) into the host cache."""
        m, layer, step = self.state[j], self._layer(visit), visit // self.L - 1
        blocks, ev = self.kv.blocks(layer, j), m.ev_d2h

        def task() -> None:
            ev.synchronize()
            with self.rec.host("cpu_attention", self._label(visit, j) + " append", phase="decode"):
                _, k, v = m.qkv_host_parts
                slots = m.base_slot_host + step
                for block, kc, vc in blocks:
                    r = block.rows
                    append(kc, vc, k[r], v[r], slots[r], m.rows_host[:block.size])
        return self.worker.submit(task)

    @decode_loop("blocking")
    def _decode_blocking(self) -> None:
        """DeepSpeed-style: load the whole layer, wait, compute every micro-batch, nothing overlapped."""
        for visit in range(self.L, self.num_visits):
            self._synchronize()
            for j in range(self.n):
                m = self.state[j]
                self.pre_attn(visit, j)
                if m.kv_on_device:
                    self.device_attn(visit, j)
                elif self.policy.attention_on_gpu:
                    layer = self._layer(visit)
                    with self.rec.gpu("h2d_kv", self.streams.compute, self._label(visit, j)):
                        staged = self._to_device(self.kv.blocks(layer, j))
                    self.device_attn(visit, j, staged)
                    self.offload_qkv(visit, j)
                    self._append_on_host(visit, j).result()
                else:
                    self.offload_qkv(visit, j)
                    self.cpu_attn(visit, j)
                    m.future.result()
                    self.load_h(visit, j)
                self.post_attn(visit, j)
                self._synchronize()
            self.load_pages(visit + 1, self.store.page_table.pages)

    def _to_device(self, blocks, non_blocking: bool = False):
        """Device copies of a micro-batch's KV blocks (s4 and blocking stream them per layer)."""
        return tuple((block, kc.to(self.device, non_blocking=non_blocking),
                      vc.to(self.device, non_blocking=non_blocking)) for block, kc, vc in blocks)

    def _synchronize(self) -> None:
        if self.streams.cuda:
            torch.cuda.synchronize()

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
        dev = ("tokens", "out", "uniforms", "base_slot", "pads", "prompt_lens", "qkv_dev", "attn_dev", "rows",
               "rope", "h")
        gpu_state = sum(nbytes(getattr(m, f)) for m in self.state for f in dev)
        gpu_state += sum(nbytes(m.step_dev[1:]) for m in self.state if m.step_dev is not None)
        host_state = nbytes(self.uniforms_host) + sum(
            nbytes((m.pads_host, m.base_slot_host, m.rows_host)) + (nbytes(m.step_host[1:]) if m.step_host else 0)
            for m in self.state)
        inputs = sum(nbytes((x["tokens"], x["cos"], x["sin"], x["last"], [g[:2] for g in x["groups"]]))
                     for _, _, x in self.chunks)
        return {"gpu_pass_state": gpu_state, "prefill_inputs": inputs, "host_pass_state": host_state,
                "io_buffers": sum(nbytes((m.qkv_host, m.attn_host)) for m in self.state)}

    # ---- results ---------------------------------------------------------------------------------
    def tokens(self) -> dict[int, list[int]]:
        """Request index -> generated tokens (synchronises)."""
        out: dict[int, list[int]] = {}
        for m in self.state:
            rows = m.out.cpu().tolist()
            for r, row in zip(m.mb.requests, rows):
                out[r] = row
        return out
