"""CPU decode attention beside the expert stream: ms per call and GB/s of KV read by the runtime's kernel
(runtime.cpu_attention.decode_attention on its attention worker), alone and while pinned host-to-device
copies run back to back on their own CUDA stream (the link's DMA reading host DRAM as the experts'
stream does), over a KV cache of one layer or spread over `--layers` layers' caches (calls cycle over
the layers, as a decode step does); and the link's rate alone and beside the attention.

    python benchmarks/attention_beside_link.py --out benchmarks/results/h200/attention_beside_link.json
    python benchmarks/attention_beside_link.py --quick        # small shapes, one and two layers (no GPU: no link)

It tells apart what slows the attention inside whole runs (H200, 2026-12-03 call 37: 36.9 ms per call at
1,207 x 272 bf16, where the profile's in-loop calls priced 26.5): the DRAM traffic of the concurrent DMA
(`link on`), and the cache's footprint (`layers`). `time_beside_link` in the summary is a call's time with
the link on over its time alone, at the largest footprint.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_attention_rate import make_cache, stored_bytes  # noqa: E402
from result_file import write_result  # noqa: E402
import runtime.cpu_attention as ca  # noqa: E402
from hrm.host import local_cpu_name  # noqa: E402
from runtime.host_memory import empty_host  # noqa: E402

MiB = 1 << 20


class LinkLoad:
    """Pinned host->device copies of `chunk_mib` from a `source_gib` buffer, issued back to back on their
    own stream by a thread until stopped; `stop()` returns the bytes/s they moved."""

    def __init__(self, source_gib: float, chunk_mib: int) -> None:
        self.chunk = chunk_mib * MiB
        self.chunks = max(1, int(source_gib * 1024) // chunk_mib)
        self.src = empty_host((self.chunks * self.chunk,), torch.uint8, True)
        self.src.fill_(1)
        self.dst = torch.empty(2 * self.chunk, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        i = 0
        with torch.cuda.stream(self.stream):
            while not self._stop.is_set():
                for j in range(4):
                    lo = (i % self.chunks) * self.chunk
                    self.dst[(j % 2) * self.chunk:(j % 2 + 1) * self.chunk].copy_(
                        self.src[lo:lo + self.chunk], non_blocking=True)
                    i += 1
                self.stream.synchronize()                      # releases the GIL while the copies run
                self.moved += 4 * self.chunk

    def start(self) -> None:
        self._stop, self.moved = threading.Event(), 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.moved / (time.perf_counter() - self._t0)


def parse_shape(text: str) -> tuple[str, int, int]:
    fmt, batch, ctx = text.split(":")
    return fmt, int(batch), int(ctx)


def time_calls(worker, q, caches, mask, layers: int, calls: int) -> list[float]:
    """Seconds of each of `calls` attention calls, cycling over the first `layers` caches."""
    def one(i):
        k, v = caches[i % layers]
        t0 = time.perf_counter()
        ca.decode_attention(q, k, v, None, None, num_slots=mask.shape[-1], mask=mask)
        return time.perf_counter() - t0
    worker.submit(one, 0).result()                                     # warm-up
    return [worker.submit(one, i).result() for i in range(calls)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[("bf16", 1207, 272), ("int8", 2189, 272)],
                   help="FORMAT:SEQUENCES:SLOTS read per call (default: call 37's two plans at the mean decode context)")
    p.add_argument("--capacity", type=int, default=288, help="cache slots per sequence (prompt + gen; default 288)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 32], help="footprints: layers' caches (default 1 32)")
    p.add_argument("--calls", type=int, default=64, help="timed calls per setting (at least one per layer)")
    p.add_argument("--source-gib", type=float, default=4.0, help="pinned buffer the link copies from")
    p.add_argument("--chunk-mib", type=int, default=256, help="bytes per copy")
    p.add_argument("--quick", action="store_true", help="bf16:64:64 int8:64:64, layers 1 2, 8 calls, 0.25 GiB")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.capacity, args.layers, args.calls, args.source_gib = (
            [("bf16", 64, 64), ("int8", 64, 64)], 80, [1, 2], 8, 0.25)
    from hrm.hf_config import load_model
    spec = load_model(args.model)
    cuda = torch.cuda.is_available()
    threads = ca.attention_threads(cuda) or torch.get_num_threads()
    worker = ca.AttentionWorker(threads)
    link = LinkLoad(args.source_gib, args.chunk_mib) if cuda else None
    t_start = time.perf_counter()
    rows, link_rows = [], []
    try:
        if link:
            link.start()
            time.sleep(2.0)
            link_rows.append({"attention": "off", "link_gb_per_s": link.stop() / 1e9})
            print(f"link alone: {link_rows[-1]['link_gb_per_s']:.1f} GB/s", flush=True)
        for fmt, batch, ctx in args.shapes:
            caches = [make_cache(fmt, batch, spec.num_key_value_heads, args.capacity, spec.head_dim, seed=i)
                      for i in range(max(args.layers))]
            q = torch.randn(batch, spec.num_attention_heads, spec.head_dim,
                            generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
            mask = torch.ones(batch, 1, 1, ctx, dtype=torch.bool)
            nbytes = stored_bytes(caches[0][0], ctx)
            for layers in args.layers:
                for on in ([False, True] if link else [False]):
                    if on:
                        link.start()
                    times = time_calls(worker, q, caches, mask, layers, max(args.calls, layers))
                    rate = link.stop() if on else None
                    s = statistics.median(times)
                    row = {"format": fmt, "batch": batch, "ctx": ctx, "layers": layers, "link": "on" if on else "off",
                           "ms_per_call": s * 1e3, "calls": len(times), "kv_bytes": nbytes,
                           "gb_per_s": nbytes / s / 1e9, "link_gb_per_s": rate / 1e9 if on else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if on:
                        link_rows.append({"attention": f"{fmt}:{batch}:{ctx} x{layers}", "link_gb_per_s": rate / 1e9})
            del caches
    finally:
        worker.close()
    summary = {}
    for fmt, batch, ctx in args.shapes:
        ms = {(r["layers"], r["link"]): r["ms_per_call"] for r in rows
              if (r["format"], r["batch"], r["ctx"]) == (fmt, batch, ctx)}
        big, small = max(args.layers), min(args.layers)
        summary[f"{fmt}:{batch}:{ctx}"] = {
            "time_of_footprint": ms[(big, "off")] / ms[(small, "off")],
            **({"time_beside_link": ms[(big, "on")] / ms[(big, "off")]} if link else {})}
    print("summary:", json.dumps(summary), flush=True)
    write_result(args.out, "benchmarks/attention_beside_link.py", argv, model=args.model, threads=threads,
                 cpu=local_cpu_name(), torch=torch.__version__, chunk_mib=args.chunk_mib, capacity=args.capacity,
                 rows=rows, link=link_rows, summary=summary, wall_s=time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
