"""Prefill of one pass: all layers on the device, micro-batch by micro-batch, each in chunks of whole
sequences (PREFILL_CHUNK_TOKENS); hidden states staged on the host between layers, KV to its cache (a
device copy, or through the pinned transfer ring to the host cache in the attention worker). The next
layer's streamed experts load in pieces, one after each chunk's hidden states on the same copy stream, so
no chunk waits behind a whole layer of weights."""
from __future__ import annotations

import torch

from hrm.memory import KV_TRANSFER_SLOTS
from hrm.policy import PREFILL_CHUNK_TOKENS

from . import attention
from .cpu_attention import quantize_kv
from .kv_cache import transfer_views
from .model import causal_attention, final_logits, post_attention, pre_attention
from .packing import MicroBatch
from .pass_state import MicroBatchState
from .rope import rope_cos_sin
from .sampling import sample


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


PREFILL_PIECE_MIN_BYTES = 16 << 20
"""Smallest piece of a layer's streamed experts prefill copies at once: transfers of 16 MiB and more run
at ~99% of the link's rate (hardware_profiles' h2d curve), and a chunk's hidden states never queue behind
more than one piece."""


def piece_schedule(num_pieces: int, num_chunks: int) -> list[range]:
    """Pieces (by index) enqueued after each of num_chunks chunks' hidden states: spread evenly from the
    first chunk on, every piece once, in order."""
    return [range(-(-c * num_pieces // num_chunks), -(-(c + 1) * num_pieces // num_chunks)) for c in range(num_chunks)]


def _copy_prefill_kv(blocks, rows: range, k: torch.Tensor, v: torch.Tensor) -> None:
    """Prefill KV of micro-batch rows `rows` (k, v [rows, n_kv, S, d], S >= every block's prefill_len) into
    the KV blocks those rows belong to (a v held in k's memory, MLA's, comes with k)."""
    for block, kc, vc in blocks:
        a, b = max(block.rows.start, rows.start), min(block.rows.stop, rows.stop)
        if a >= b:
            continue
        t, first = block.prefill_len, block.rows.start
        kc[a - first:b - first, :, :t].copy_(k[a - rows.start:b - rows.start, :, :t])
        if vc.data_ptr() != kc.data_ptr():
            vc[a - first:b - first, :, :t].copy_(v[a - rows.start:b - rows.start, :, :t])


class PrefillPass:
    """Pipeline's prefill (a mixin: the pass's state, streams and buffers are Pipeline's)."""

    def prefill(self) -> None:
        """All layers on the device, micro-batch by micro-batch, each in chunks of whole sequences of at
        most PREFILL_CHUNK_TOKENS tokens (the chunk, not the micro-batch, sets the activation peak);
        hidden states and KV go to the host between layers (KV to the device cache for micro-batches
        that keep it there)."""
        self.rec.phase = "prefill"
        st, spec = self.streams, self.spec
        self.load_pages(0, self.store.page_table.pages)
        chunks, hidden = self.chunks, self.hidden
        pieces = self.store.page_table.pieces(len(chunks), PREFILL_PIECE_MIN_BYTES // self.store.offloaded.element_size())
        after_chunk = piece_schedule(len(pieces), len(chunks))
        ev_hidden_d2h: list[object] = [None] * len(chunks)
        kv_writes: list[object] = []
        for visit in range(self.L):
            layer = self.store.dense.layers[visit]
            for c, (m, rows, x) in enumerate(chunks):
                j = m.mb.index
                label = self._label(visit, j) + ("" if len(rows) == m.mb.size else f" r{rows.start}")
                if visit == 0:
                    h_in = None
                else:
                    st.wait(st.h2d, ev_hidden_d2h[c])
                    with st.use(st.h2d), self.rec.gpu("h2d_hidden", st.h2d, label):
                        h_in = hidden[c].to(self.device, non_blocking=True)
                        ev_h = st.record(st.h2d)
                self.load_pages(visit + 1, pieces[after_chunk[c].start:after_chunk[c].stop])
                if visit > 0:
                    st.wait(st.compute, ev_h)
                if c == 0:
                    self._wait_pages(visit)
                with st.use(st.compute), self.rec.gpu("gpu_compute", st.compute, label):
                    h = self.store.dense.embed[x["tokens"]] if visit == 0 else h_in  # [tokens, hidden]
                    q, k, v = pre_attention(h, layer, spec, x["cos"], x["sin"])
                    attn = q.new_empty(q.shape[0], q.shape[1] * v.shape[2])            # [tokens, n_q dv]
                    la = self.attention_dev[visit]
                    for idx, _, pad in x["groups"]:                                  # idx [G, len]
                        attn[idx] = (causal_attention(q[idx], k[idx], v[idx], pad) if la is None
                                     else attention.causal(q[idx], k[idx], v[idx], pad, la))
                    h = post_attention(h, attn, layer, self.store.lookup(visit, visit % 2), spec, host_sync_ok=True,
                                       reuse_dequant=True)   # eager, and each layer's first chunk re-reads
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
        for m in self.state:                     # the first generated column: who ended at once
            self._mark_ended(m, 0, last=m is self.state[-1])
        for f in kv_writes:
            if f is not None:
                f.result()

    def _prefill_inputs(self, m: MicroBatchState, rows: range) -> dict:
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
        cache layout (MLA: v is the view of k's first kv_lora_rank elements, as in the cache)."""
        shared = self.spec.attention == "mla"
        kpad = torch.zeros((num_rows, mb.prefill_len) + tuple(k.shape[1:]), dtype=k.dtype, device=k.device)
        vpad = None if shared else torch.zeros((num_rows, mb.prefill_len) + tuple(v.shape[1:]), dtype=v.dtype,
                                               device=v.device)
        for idx, rows, _ in x["groups"]:
            length = idx.shape[1]
            kpad[rows, :length] = k[idx]
            if not shared:
                vpad[rows, :length] = v[idx]
        kpad = kpad.transpose(1, 2).contiguous()
        return kpad, (kpad[..., :v.shape[-1]] if shared else vpad.transpose(1, 2).contiguous())

    def _store_prefill_kv(self, visit: int, m: MicroBatchState, rows: range, kpad, vpad, ev_c, label: str):
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
        if self.kv.format:                  # an 8-bit cache: quantized on the GPU, its stored bytes cross the link
            with st.use(st.compute):
                kpad, vpad = (quantize_kv(x, self.kv.format) for x in (kpad, vpad))
                ev_c = st.record(st.compute)
        shared = vpad.data_ptr() == kpad.data_ptr()                               # MLA's latent
        buf = self.kv_slots[i]
        if self.kv.format:
            k_host, v_host = transfer_views(buf, kpad.shape, self.kv.format)
        else:
            k_host = buf[:kpad.numel()].view(kpad.shape)                           # [B, n_kv, S, d]
            v_host = k_host[..., :vpad.shape[-1]] if shared else \
                buf[kpad.numel():kpad.numel() + vpad.numel()].view(vpad.shape)
        st.wait(st.d2h, ev_c)
        with st.use(st.d2h), self.rec.gpu("d2h", st.d2h, label):
            k_host.copy_(kpad, non_blocking=True)
            if not shared:
                v_host.copy_(vpad, non_blocking=True)
            ev = st.record(st.d2h)
            if st.cuda:
                kpad.record_stream(st.d2h)
                if not shared:
                    vpad.record_stream(st.d2h)

        def write() -> None:
            ev.synchronize()
            with self.rec.host("d2h", label + " kv", phase="prefill"):
                _copy_prefill_kv(blocks, rows, k_host, v_host)
        self.kv_slot_writes[i] = self.worker.submit(write)
        return self.kv_slot_writes[i]
