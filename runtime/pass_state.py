"""What one pass keeps per micro-batch (MicroBatchState) and the CUDA streams it runs on (Streams; without
CUDA, streams are None and events are already complete, so the same code runs sequentially)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .packing import MicroBatch


class _Done:
    """The event of work that already ran (no CUDA)."""

    def synchronize(self) -> None:
        pass


DONE = _Done()


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
class MicroBatchState:
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
    done: torch.Tensor              # [B] device bool: the sequence has sampled a stop token
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
