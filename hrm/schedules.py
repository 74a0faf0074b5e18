"""Decode schedules as values: one registry holds, per schedule, where its attention may run, whether
layers overlap, and how a layer's resource times compose into its time. The runtime registers a decode
loop under each name (runtime.decode.DECODE_LOOPS); a test checks that the two registries agree.

Adding a schedule: `register(Schedule(...))` here (or from any module) and a loop in the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Schedule:
    name: str
    description: str
    attention_on_gpu: tuple[bool, ...]     # where its attention may run (False: the CPU)
    terms: Callable                       # LayerTimes -> {name: seconds}: the layer's time is their max
    pipelined: bool = True                # the next layer's weights load during this one
    overlapped_attention: bool = False    # CPU attention runs beside the launching thread (the in-loop rate)
    one_micro_batch_as: str | None = None  # with one micro-batch it runs as this schedule does
    kv_stream_buffers: int = 1            # under GPU attention: device copies of one micro-batch's KV layer

    def allows(self, attention_on_gpu: bool) -> bool:
        return bool(attention_on_gpu) in self.attention_on_gpu


SCHEDULES: dict[str, Schedule] = {}


def register(schedule: Schedule) -> Schedule:
    SCHEDULES[schedule.name] = schedule
    return schedule


def schedule_named(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise KeyError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _overlapped(lt) -> dict:
    """Every resource runs beside the others: the busiest one, or one micro-batch's round trip."""
    return {"gpu": lt.gpu_s, "cpu": lt.cpu_s, "h2d": lt.h2d_s, "d2h": lt.d2h_s, "link": lt.link_s,
            "pipeline": lt.pipeline_s, "launch": lt.launch_s}


def _s3(lt) -> dict:
    """CPU attention is not overlapped with GPU work. The next layer's weights go as one block on the H2D
    stream after the first micro-batch's activations, so every later micro-batch's activations wait
    behind it: the block plus the rest of the serial chain (MISSION.md S2/S3). The launching thread also
    waits for each attention in place, so its per-visit work runs in series with the attention: the same
    chain with the launches in place of the GPU's work (two terms rather than a max inside one, so that
    every term stays linear in r_w and r_c)."""
    serial = lt.gpu_s + lt.cpu_s + lt.d2h_s + lt.h2d_act_s
    host_chain = lt.launch_s + lt.cpu_s + lt.d2h_s + lt.h2d_act_s
    rest = 1.0 - 1.0 / lt.num_micro_batches
    return {"h2d": lt.h2d_s, "link": lt.link_s, "serial": serial, "launch": lt.launch_s,
            "weights_block": lt.h2d_weights_s + rest * serial,
            "host_chain": host_chain, "host_block": lt.h2d_weights_s + rest * host_chain}


def _blocking(lt) -> dict:
    """Every visit synchronises, so nothing overlaps the transfers and the CPU work; the host's launches
    run beside the GPU's work (two terms, so that each stays linear in r_w and r_c)."""
    rest = lt.h2d_s + lt.cpu_s + lt.d2h_s
    return {"serial": rest + lt.gpu_s, "serial_host": rest + lt.launch_s}


register(Schedule("cgopipe", "the paper's S1: CPU attention overlapped with GPU work, weights paged per "
                  "micro-batch", (False,), _overlapped, overlapped_attention=True, one_micro_batch_as="s3"))
register(Schedule("s3", "FlexGen(c): CPU attention without overlap", (False,), _s3))
register(Schedule("s4", "FlexGen: GPU attention with the KV cache streamed, double-buffered", (True,),
                  _overlapped, kv_stream_buffers=2))
register(Schedule("blocking", "nothing overlapped (DeepSpeed Zero-Inference style: load a layer, then "
                  "compute it)", (False, True), _blocking, pipelined=False))
