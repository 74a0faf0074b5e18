"""profile_machine(): every measurement of this machine (progress bar), the CPU part only without CUDA.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


from hrm.units import MiB

from .base import ProbeError
from .calibration import (MOE_MODELS, MOE_TOKENS_PER_EXPERT, MOE_TOKENS_PER_EXPERT_QUICK, PREFILL_PROMPT_LEN,
                          PREFILL_REST_MODELS, PREFILL_SEQS, PREFILL_SEQS_QUICK, attention_in_pipeline_by_micro_batch,
                          cpu_attention_call_s, gpu_moe_flops_per_s, memory_baseline, moe_shape, prefill_costs,
                          prefill_layers, prefill_rest_flops, runtime_overheads)
from .machine import (ATTENTION_SHAPES, ATTENTION_SHAPES_QUICK, AttentionKernel, GEMM_TOKENS,
                      GEMM_TOKENS_QUICK, KV_FORMAT_SHAPE, KV_FORMAT_SHAPE_QUICK, LINK_SIZES, LINK_SIZES_QUICK,
                      cpu_attention_bytes_per_s, cpu_attention_time_of_compute,
                      cpu_dram_bytes_per_s, cpu_matmul_flops, cpu_memory_bytes, cpu_name, duplex_bytes_per_s,
                      gpu_gemm_flops_per_s, gpu_hbm_bytes_per_s, gpu_square_gemm_flops_per_s, link_bytes_per_s,
                      pageable_h2d_bytes_per_s, peer_bytes_per_s, runtime_attention_kernel)




def _versions() -> dict:
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return ""

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "numpy": version("numpy"),
            "moe_lightning": version("moe-lightning"), "git_commit": commit}


def _model_shapes(spec) -> dict:
    if spec is None:
        return {"model": "mixtral-8x7b", "hidden_size": 4096, "moe_intermediate_size": 14336,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    return {"model": spec.name, "hidden_size": spec.hidden_size,
            "moe_intermediate_size": spec.moe_intermediate_size,
            "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim}


def _attention_by_shape(shapes: dict, att_shapes, kernel, kernel_name: str, use_gpu: bool, repeats: int,
                        quick: bool = False) -> dict:
    """The CPU decode-attention kernel's KV bytes/s at each (batch, ctx) of `att_shapes` (the [cpu]
    result's "attention" and its median "attention_kv_bytes_per_s"), and the runtime's attention time over
    each 8-bit KV format over bf16's (cpu_attention_time_of_compute), timed on the runtime's attention
    worker thread with the threads it gets (fewer when it shares the host with a GPU-driving main thread)."""
    from hrm.formats import SCALED_KV_FORMATS

    from ..cpu_attention import AttentionWorker, attention_threads
    heads = (shapes["num_attention_heads"], shapes["num_key_value_heads"], shapes["head_dim"])
    worker = AttentionWorker(attention_threads(use_gpu))
    try:
        rates, threads = worker.submit(lambda: (cpu_attention_bytes_per_s(
            att_shapes, *heads, torch.bfloat16, kernel, repeats=repeats), torch.get_num_threads())).result()
        format_shape = KV_FORMAT_SHAPE_QUICK if quick else KV_FORMAT_SHAPE
        by_format = worker.submit(cpu_attention_time_of_compute, SCALED_KV_FORMATS, format_shape, *heads,
                                  repeats).result()
    finally:
        worker.close()
    return {"attention": {"kernel": kernel_name, "dtype": "bf16", "shapes": [list(s) for s in att_shapes],
                          "threads": threads, "kv_bytes_per_s": rates,
                          "kv_format_shape": list(format_shape), "time_of_compute_by_kv_format": by_format},
            "attention_kv_bytes_per_s": statistics.median(rates)}


def _header(shapes: dict, quick: bool) -> dict:
    """What every result starts with: when, where, which versions, at which model's shapes."""
    return {"date": _dt.date.today().isoformat(),
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "quick": quick, "versions": _versions(), "shapes": shapes, "notes": []}


def _setup(spec, gpu: bool | None, quick: bool, attention_kernel: AttentionKernel | None) -> tuple:
    """(the model's shapes, whether the GPU is measured, repeats, the attention kernel and its name) of a run."""
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    if use_gpu and not torch.cuda.is_available():
        raise ProbeError("no CUDA GPU here")
    kernel, kernel_name = (attention_kernel, getattr(attention_kernel, "__name__", "custom")) \
        if attention_kernel else runtime_attention_kernel()
    return _model_shapes(spec), use_gpu, 3 if quick else 10, kernel, kernel_name


def profile_machine(spec=None, quick: bool = False, progress: bool = True, gpu: bool | None = None,
                    attention_kernel: AttentionKernel | None = None) -> dict:
    """Run every micro-benchmark and return a JSON-ready dict of the results in SI units.

    spec: a ModelSpec for the GEMM and attention shapes (default Mixtral-8x7B's). gpu: profile the GPU
    and the link (default: when CUDA is available). quick: small sizes and few repeats (seconds).
    attention_kernel: the CPU decode-attention kernel to measure (default: the runtime's own)."""
    shapes, use_gpu, rep, kernel, kernel_name = _setup(spec, gpu, quick, attention_kernel)
    result = {
        **_header(shapes, quick), "gpu": None, "link": None,
        "cpu": {"name": cpu_name(), "cores": os.cpu_count() or 1, "torch_threads": torch.get_num_threads(),
                "memory_bytes": cpu_memory_bytes()},
    }
    if not use_gpu:
        result["notes"].append("no CUDA GPU: profiled the CPU part only; [gpu] and [link] are not measured")
    tokens = GEMM_TOKENS_QUICK if quick else GEMM_TOKENS
    link_sizes = LINK_SIZES_QUICK if quick else LINK_SIZES
    big = (64 if quick else 1024) * MiB
    att_shapes = ATTENTION_SHAPES_QUICK if quick else ATTENTION_SHAPES
    steps: list[tuple[str, Callable[[], None]]] = []
    g, lk, c = {}, {}, result["cpu"]

    if use_gpu:
        def gpu_info():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            g.update(name=props.name, count=torch.cuda.device_count(), memory_bytes=int(total),
                     free_bytes=int(free), multiprocessors=props.multi_processor_count,
                     capability=f"{props.major}.{props.minor}",
                     tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))

        def gemm():
            g["gemm_tokens"] = list(tokens)
            g["gemm_flops_per_s"] = gpu_gemm_flops_per_s(tokens, shapes["hidden_size"], shapes["moe_intermediate_size"],
                                                   repeats=rep)
            g["gemm_shape"] = f"[tokens x {shapes['hidden_size']}] x [{shapes['hidden_size']} x " \
                              f"{shapes['moe_intermediate_size']}] bf16"

        def square():
            n = 4096 if quick else 8192
            g["square_gemm_n"] = n
            g["square_gemm_flops_per_s"] = {name: gpu_square_gemm_flops_per_s(n, dt, repeats=rep) for name, dt in
                                            (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))}

        def hbm():
            g["hbm_copy_size_bytes"] = big
            g["hbm_copy_bytes_per_s"] = gpu_hbm_bytes_per_s(big, repeats=rep)

        def link():
            lk["sizes_bytes"] = list(link_sizes)
            lk["h2d_bytes_per_s"], lk["d2h_bytes_per_s"] = link_bytes_per_s(link_sizes, repeats=rep)

        def duplex():
            lk["duplex_size_bytes"] = max(link_sizes)
            lk["duplex_bytes_per_s"] = duplex_bytes_per_s(max(link_sizes), repeats=3 if quick else 5)

        def pageable():
            lk["pageable_size_bytes"] = max(link_sizes)
            lk["pageable_h2d_bytes_per_s"] = pageable_h2d_bytes_per_s(max(link_sizes), repeats=3 if quick else 5)

        def peer():
            lk["peer_size_bytes"] = max(link_sizes)
            lk["peer_bytes_per_s"] = peer_bytes_per_s(max(link_sizes), repeats=3 if quick else 5)

        steps += [("GPU properties", gpu_info), ("GPU GEMM by tokens", gemm), ("GPU square GEMM", square),
                  ("HBM copy", hbm), ("pinned H2D/D2H by size", link), ("H2D + D2H at once", duplex),
                  ("pageable H2D", pageable)]
        if torch.cuda.device_count() > 1:
            steps.append(("GPU 0 -> GPU 1", peer))

    def dram():
        c["dram_size_bytes"] = big
        c["dram_copy_bytes_per_s"], c["dram_read_bytes_per_s"] = cpu_dram_bytes_per_s(big, repeats=3 if quick else 5)

    def matmul():
        c["matmul_flops_per_s"], c["matmul_n"] = {}, {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            c["matmul_flops_per_s"][name], c["matmul_n"][name] = cpu_matmul_flops(
                dt, max_n=512 if quick else 4096, repeats=2 if quick else 3)

    def attention():
        c.update(_attention_by_shape(shapes, att_shapes, kernel, kernel_name, use_gpu, rep, quick))

    def overheads():
        from hrm.hf_config import load_model
        c["runtime"] = runtime_overheads(spec or load_model("mixtral-8x7b"), visits=64 if quick else 256, quick=quick)

    def moe():
        from hrm.hf_config import load_model
        models = [load_model(name) for name in MOE_MODELS]
        if spec is not None and moe_shape(spec) not in [moe_shape(m) for m in models]:
            models.append(spec)
        per_expert = list(MOE_TOKENS_PER_EXPERT_QUICK if quick else MOE_TOKENS_PER_EXPERT)
        g["moe_models"] = [m.name for m in models]
        g["moe_shapes"] = [moe_shape(m) for m in models]
        g["moe_tokens_per_expert"] = [per_expert for _ in models]
        g["moe_flops_per_s"] = [gpu_moe_flops_per_s(m, per_expert, repeats=2 if quick else 5) for m in models]

    def prefill():
        from hrm.hf_config import load_model
        seqs = PREFILL_SEQS_QUICK if quick else PREFILL_SEQS
        g.update(prefill_by_model(spec or load_model("mixtral-8x7b"), seqs, quick, result["notes"], g))

    steps += [("CPU DRAM copy/read", dram), ("CPU matmul fp32/bf16", matmul), ("CPU decode attention", attention)]
    if use_gpu or not quick:
        steps.append(("runtime decode overheads", overheads))
    def memory():
        result["memory"] = memory_baseline(use_gpu, quick=quick)

    if use_gpu:
        steps.append(("runtime MoE layer at prefill sizes", moe))
        steps.append(("runtime prefill layer", prefill))
    steps.append(("runtime process memory", memory))

    result["elapsed_s"] = _run_steps(steps, progress, use_gpu)
    if use_gpu:
        result["gpu"], result["link"] = g, lk
    return result


def _run_steps(steps: list[tuple[str, Callable[[], None]]], progress: bool, use_gpu: bool) -> float:
    """Run each (label, step) under the progress bar; the seconds they took."""
    t0 = time.perf_counter()
    with _progress(len(steps), progress) as bar:
        for label, step in steps:
            bar.set_postfix_str(label)
            step()
            if use_gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            bar.update()
    return time.perf_counter() - t0


def profile_cpu_attention(spec=None, quick: bool = False, progress: bool = True, gpu: bool | None = None,
                          attention_kernel: AttentionKernel | None = None) -> dict:
    """Only what profile_machine measures of the runtime's CPU decode attention, in the shape of its result
    (the [cpu] part's "attention", "attention_kv_bytes_per_s" and, under "runtime", "cpu_attention_call_s"
    and, with CUDA, the in-loop calibration of attention_in_pipeline_by_micro_batch), for
    profile_toml.update_cpu_attention: the kernel alone by shape, one call's fixed cost, and the kernel
    inside the CGOPipe decode loop. Without CUDA the last is not measured (as in profile_machine), and a
    note says so."""
    shapes, use_gpu, rep, kernel, kernel_name = _setup(spec, gpu, quick, attention_kernel)
    result = {**_header(shapes, quick), "only": "cpu-attention", "gpu_measured": use_gpu, "cpu": {"runtime": {}}}
    c, rt = result["cpu"], result["cpu"]["runtime"]
    if not use_gpu:
        result["notes"].append("no CUDA GPU: the CPU attention inside the decode loop (cpu_attention_overlapped_*, "
                               "cpu_attention_loop_*) is not measured; the base profile's values are kept")

    def model():
        from hrm.hf_config import load_model
        return spec or load_model("mixtral-8x7b")

    def attention():
        c.update(_attention_by_shape(shapes, ATTENTION_SHAPES_QUICK if quick else ATTENTION_SHAPES, kernel,
                                     kernel_name, use_gpu, rep, quick))

    def call():
        rt["cpu_attention_call_s"] = cpu_attention_call_s(model())

    def in_loop():
        rt.update(attention_in_pipeline_by_micro_batch(model(), quick))

    steps = [("CPU decode attention", attention), ("CPU attention call overhead", call)]
    if use_gpu:
        steps.append(("CPU attention inside the decode loop", in_loop))
    result["elapsed_s"] = _run_steps(steps, progress, use_gpu)
    return result


def prefill_by_model(model, seqs, quick: bool, notes: list, gemm: dict) -> dict:
    """The runtime's prefill of `model` (prefill_costs and the rest rate, the [gpu] result's prefill_* keys),
    and the rest rate of each PREFILL_REST_MODELS model of another attention shape (prefill_rest_by_shape,
    the profiled model first). `gemm`: the [gpu] result's GEMM curve and HBM rate, which price the dense
    FFN the rest excludes. What could not be measured is a line in `notes`; the HRM falls back."""
    from hrm.hardware import interp_log
    from hrm.hf_config import load_model
    from hrm.rates import attention_shape, roofline_s
    tokens = [n * PREFILL_PROMPT_LEN for n in seqs]

    def dense_ffn_s(cost, t):
        """The HRM's price of a dense FFN (hrm.rates.gpu_time) at this profile's GEMM curve and HBM rate."""
        return roofline_s(cost, interp_log(t, gemm["gemm_tokens"], gemm["gemm_flops_per_s"]), gemm["hbm_copy_bytes_per_s"])

    def measure(m):
        """(prefill_costs with its depths or None, rest FLOP/s per chunk size or None, a note or None)."""
        depths = prefill_layers(m, torch.cuda.mem_get_info()[0])
        if depths is None:
            return None, None, f"runtime prefill of {m.name} not measured: two layers do not fit the GPU"
        try:
            r = prefill_costs(m, seqs, layers=depths, repeats=2 if quick else 3)
        except Exception as e:  # the other measurements still make a profile
            return None, None, f"runtime prefill of {m.name} not measured: {type(e).__name__}: {e}".splitlines()[0]
        r["layers"] = list(depths)
        rest = prefill_rest_flops(m, tokens, r["flops_per_s"], PREFILL_PROMPT_LEN, dense_ffn_s, repeats=2 if quick else 5)
        if None in rest:
            return r, None, (f"runtime prefill of {m.name}: the MoE layer alone took as long as the whole layer; "
                             "the rest of its layer is priced by the roofline")
        return r, rest, None

    out: dict = {}
    r, rest, note = measure(model)
    notes += [note] if note else []
    if r is None:
        return out
    out.update(prefill_prompt_len=PREFILL_PROMPT_LEN, prefill_layers=r["layers"], prefill_tokens=tokens,
               prefill_flops_per_s=r["flops_per_s"], prefill_pass_s_per_token=r["pass_s_per_token"],
               prefill_model=model.name)
    by_shape = []
    if rest is not None:
        out["prefill_rest_flops_per_s"] = rest
        by_shape.append((model, rest))
    for other in (load_model(name) for name in PREFILL_REST_MODELS):
        if other.name == model.name or attention_shape(other) in [attention_shape(m) for m, _ in by_shape]:
            continue
        _, other_rest, note = measure(other)
        notes += [note] if note else []
        if other_rest is not None:
            by_shape.append((other, other_rest))
    out["prefill_rest_by_shape"] = [{"model": m.name, "shape": list(attention_shape(m)), "tokens": tokens,
                                     "rest_flops_per_s": rates} for m, rates in by_shape]
    return out


class _Lines:
    """Progress as plain lines on stderr, where tqdm is not installed."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.show = total, 0, show

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_postfix_str(self, label: str) -> None:
        if self.show:
            print(f"profiling [{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.done += 1


def _progress(total: int, show: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, show)
    return tqdm(total=total, desc="profiling", unit="bench", disable=not show, file=sys.stderr)
