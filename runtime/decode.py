"""Decode of one pass: the tasks of a (visit, micro-batch) (MISSION.md, Algorithm 1: PreAttn -> OffloadQKV
-> CPUAttn -> LoadH -> PostAttn, or attention on the device) and the loops that order them, one per
schedule, registered by name (DECODE_LOOPS; hrm.schedules holds the same names)."""
from __future__ import annotations

import torch

from . import attention
from .cpu_attention import attention_mask, decode_attention
from .kv_cache import append
from .model import final_logits, post_attention, pre_attention_packed
from .pass_state import MicroBatchState
from .sampling import sample
from .weights import Page

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


def attend_blocks(blocks, masks, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, la=None) -> None:
    """One decode step of a micro-batch over its KV blocks: this step's k, v [B, n_kv, d] appended at
    slots [B], then q [B, n_q, d] attends block by block into out [B, n_q d]. masks: per block
    [rows, 1, 1, T] (Pipeline._step_tensors: the sliding ones for a sliding layer); rows: arange(>= the
    largest block) on the cache's device. `la`: the layer's attention.LayerAttention (None: the plain kernels)."""
    for (block, kc, vc), mask in zip(blocks, masks):
        r, t = block.rows, block.prefill_len + step + 1
        if la is None:
            append(kc, vc, k[r], v[r], slots[r], rows[:block.size])
            out[r] = decode_attention(q[r], kc, vc, None, None, t, mask=mask)
        else:
            attention.append(kc, vc, k[r], v[r], slots[r], rows[:block.size], la)
            out[r] = attention.decode(q[r], kc, vc, t, mask, la)


def layer_masks(step_tensors: tuple, la) -> tuple:
    """The decode masks of a step (Pipeline._step_tensors) a layer attends under: the window's or the full ones."""
    return step_tensors[3] if la is not None and la.window else step_tensors[2]


class DecodePass:
    """Pipeline's decode (a mixin: the pass's state, streams and buffers are Pipeline's)."""

    def _mark_ended(self, m: MicroBatchState, column: int, last: bool) -> None:
        """After sampling `column` of micro-batch m: which of its sequences have ended, whether all of the
        pass's have (after the last micro-batch: to the host, without waiting)."""
        if self.stop_ids is None:
            return
        m.done |= torch.isin(m.tokens, self.stop_ids)
        self.ended_dev[column] &= m.done.all()
        if last:
            st = self.streams
            self.ended_host[column:column + 1].copy_(self.ended_dev[column:column + 1], non_blocking=True)
            self.ended_events[column] = st.record(st.compute)

    def stop_before(self, visit: int) -> bool:
        """Whether the pass can end before `visit`: at a decode step's first layer, once every sequence had
        ended two columns back (a column long computed: no stall). The pass then returns the columns up to
        the one being computed; each sequence's tokens after its stop token are the caller's to drop."""
        if self.stop_ids is None or visit % self.L:
            return False
        step = visit // self.L - 1               # this step samples column step + 1
        column = step - 1
        if column < 0 or self.ended_events[column] is None:
            return False
        self.ended_events[column].synchronize()
        if not bool(self.ended_host[column]):
            return False
        self.columns = step + 1
        return True

    def _drain(self) -> None:
        """Wait for every task of the pass (a loop that stopped early left some in flight)."""
        for m in self.state:
            if m.future is not None:
                m.future.result()
        self._synchronize()

    def _begin_token(self, m: MicroBatchState, step: int) -> None:
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

    def _step_tensors(self, m: MicroBatchState, step: int, base_slot: torch.Tensor, pads: torch.Tensor) -> tuple:
        """(step, slots [B] of this step's token, per KV block its valid-slot mask [rows, 1, 1, T], and where
        layers slide the window's masks) of a micro-batch: they depend on the step only, so they are built
        once per step and reused by every layer."""
        slots = base_slot + step                                                    # [B]
        full = tuple(attention_mask(pads[b.rows], slots[b.rows] + 1, b.prefill_len + step + 1) for b in m.mb.blocks)
        window = self.spec.sliding_window
        sliding = () if not self.spec.sliding_layers else tuple(
            attention_mask(torch.maximum(pads[b.rows], slots[b.rows] + 1 - window), slots[b.rows] + 1,
                           b.prefill_len + step + 1) for b in m.mb.blocks)
        return step, slots, full, sliding

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
                la = self.attention_host[layer]
                attend_blocks(blocks, layer_masks(m.step_host, la), step, q, k, v, m.step_host[1], m.rows_host,
                              m.attn_host, la)
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
            la = self.attention_dev[layer]
            attend_blocks(blocks, layer_masks(m.step_dev, la), step, q, k, v, m.step_dev[1], m.rows, m.attn_dev, la)
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
                m.h = post_attention(m.h, m.attn_dev, self.store.dense.layers[layer], lookup, self.spec,
                                     reuse_dequant=self.graphs is None)
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
                self._mark_ended(m, step + 1, last=j == self.n - 1)
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
            self._drain()

    @decode_loop("cgopipe")
    def _decode_cgopipe(self) -> None:
        """Algorithm 1 over the flattened (visit, micro-batch) sequence, `ahead` tasks in front."""
        first, n = self.L, self.n
        tasks = [(v, j) for v in range(first, self.num_visits) for j in range(n)]
        ahead = min(PIPELINE_AHEAD, n)            # front(v + 1, j) must follow back(v, j)
        for t in range(min(ahead, len(tasks))):
            self.front(*tasks[t])
        for t, (visit, j) in enumerate(tasks):
            if j == 0 and self.stop_before(visit):
                break
            self.back(visit, j, self._pages_for(j))
            if t + ahead < len(tasks):
                self.front(*tasks[t + ahead])

    @decode_loop("s3")
    def _decode_s3(self) -> None:
        """FlexGen(c): next layer's weights loaded at the layer start; CPU attention waited for in place."""
        for visit in range(self.L, self.num_visits):
            if self.stop_before(visit):
                break
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
                staging[b] = self._to_device(self.kv.blocks(layer, j), b, non_blocking=True)
                staged_ev[b] = st.record(st.h2d_kv)

        if order:
            prefetch(0)
        for t, (visit, j) in enumerate(order):
            if j == 0 and self.stop_before(visit):
                break
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
                slots, la = m.base_slot_host + step, self.attention_host[layer]
                for block, kc, vc in blocks:
                    r = block.rows
                    if la is None:
                        append(kc, vc, k[r], v[r], slots[r], m.rows_host[:block.size])
                    else:
                        attention.append(kc, vc, k[r], v[r], slots[r], m.rows_host[:block.size], la)
        return self.worker.submit(task)

    @decode_loop("blocking")
    def _decode_blocking(self) -> None:
        """DeepSpeed-style: load the whole layer, wait, compute every micro-batch, nothing overlapped."""
        for visit in range(self.L, self.num_visits):
            self._synchronize()
            if self.stop_before(visit):
                break
            for j in range(self.n):
                m = self.state[j]
                self.pre_attn(visit, j)
                if m.kv_on_device:
                    self.device_attn(visit, j)
                elif self.policy.attention_on_gpu:
                    layer = self._layer(visit)
                    with self.rec.gpu("h2d_kv", self.streams.compute, self._label(visit, j)):
                        staged = self._to_device(self.kv.blocks(layer, j), 0)
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

    def _to_device(self, blocks, buffer: int, non_blocking: bool = False):
        """Device copies of a micro-batch's KV blocks (s4 and blocking stream them per layer) in the pass's
        KV stream buffer `buffer` (Pipeline.kv_stream): views of it, in block order."""
        flat, off, out = self.kv_stream[buffer], 0, []
        for block, kc, vc in blocks:
            kd = flat[off:off + kc.numel()].view(kc.shape)
            kd.copy_(kc, non_blocking=non_blocking)
            off += kc.numel()
            if vc.data_ptr() == kc.data_ptr():                    # MLA: v is k's first elements
                vd = kd[..., :vc.shape[-1]]
            else:
                vd = flat[off:off + vc.numel()].view(vc.shape)
                vd.copy_(vc, non_blocking=non_blocking)
                off += vc.numel()
            out.append((block, kd, vd))
        return tuple(out)

    def _synchronize(self) -> None:
        if self.streams.cuda:
            torch.cuda.synchronize()
