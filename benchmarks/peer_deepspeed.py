"""Peer: DeepSpeed ZeRO-Inference (ZeRO stage 3, parameters offloaded to pinned CPU memory), the MoE-Lightning
paper's baseline.

A Mixtral-shaped model (our registry's config, optionally with fewer layers) with random bf16 weights is built
the way transformers builds any model under ZeRO-3: a `transformers.integrations.HfDeepSpeedConfig` is alive
while `AutoModelForCausalLM.from_config` runs, so every parameter is created inside `deepspeed.zero.Init`
and partitioned at once into DeepSpeed's own host store (one process, so each partition is the whole tensor;
`offload_param: {device: cpu, pin_memory: true}`). The values are then drawn in place, layer by layer, under
`deepspeed.zero.GatheredParameters(..., modifier_rank=0)` by our runtime's synthetic generator
(`runtime.synthetic._Filler`; on the GPU when there is one). `deepspeed.initialize(model=..., config=...)`
(no optimizer: the engine is DeepSpeed's ZeRO-3 parameter offload) then wraps it, and `engine.module.generate`
(greedy, exactly gen_len new tokens) is timed for each batch size. Every forward pass fetches each offloaded
parameter from pinned host memory to the GPU and frees it after use (the recipe of DeepSpeedExamples'
inference/huggingface/zero_inference: prefetch bucket 2h^2 elements, max live parameters 2h^2, parameters
of at most h elements persist on the GPU; `--zero-override` changes any of them). The KV cache is HF's, on
the GPU (ZeRO-Inference's KV offload exists only for its patched OPT/BLOOM models).

Host memory: the model exists once, in DeepSpeed's pinned partitions. Each parameter is created on the GPU
by zero.Init and copied to its partition; nothing else holds weights on the host. torch's pinned allocator
rounds every block up to a power of two, so Mixtral-8x7B's 87 GiB of weights pin about 99 GiB (each layer's
fused expert tensors: 1.75 GiB -> 2 GiB and 0.875 GiB -> 1 GiB). The run refuses to start when that
estimate (printed and recorded) does not fit in the host's available memory.

GPU budget: --gpu-budget-gib is for the full model. The process is capped at it with
torch.cuda.set_per_process_memory_fraction (after the build), so exceeding it is an OOM, recorded per batch
size. With --num-layers L the cap is the budget less the KV cache of the layers not built (the same room for
live parameters and activations as the full model). What limits the batch is HF's prefill, which runs the
whole prompt batch at once: transformers' grouped_mm experts hold [2 * batch * prompt, 2 * intermediate]
gate/up activations (7 GiB at batch 256, prompt 256), beside the KV cache (9 GiB at batch 256, 288 tokens)
and the one layer's experts being used (2.6 GiB).
tokens/s = batch * gen_len / wall time of generate (CUDA synchronised), prefill included; prefill_s is a
separate generate of one token, decode tokens/s = batch * (gen_len - 1) / (wall - prefill_s).
Batch sizes run in the order given; --stop-after-ok 1 with a descending list finds the largest that fits.
A batch size is not started when the time it would take (from the last run, or from the warm-up's time per
forward pass) does not fit in what --time-limit-s leaves; it is recorded as skipped.

  bash benchmarks/build_deepspeed_wheels.sh                                      # here, with network
  python -m pip install --no-index --no-deps .whl/deepspeed/*.whl               # there, the carried wheels
  PYTHONPATH=. python benchmarks/peer_deepspeed.py --gpu-budget-gib 24 --batch-sizes 384,320,256 \\
      --prompt-len 256 --gen-len 32 --stop-after-ok 1
  PYTHONPATH=. python benchmarks/peer_deepspeed.py --tiny        # CPU smoke test (DeepSpeed's CPU accelerator)
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import socket
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import peer_hf_accelerate as hf  # noqa: E402 (the sibling peer)
from peer_hf_accelerate import DEFAULT_CONFIG, GiB, _head_dim, build_config  # noqa: E402

NAME = "peer_deepspeed"
TAG = "peer:deepspeed"
DEFAULT_BATCH_SIZES = "384,320,256,224,192,160,128,64,16"
HOST_RESERVE_BYTES = 6 * GiB      # the process itself, CUDA's context, the KV's host side, page cache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="HF config.json (default: Mixtral-8x7B)")
    p.add_argument("--num-layers", type=int, default=None, help="build only this many decoder layers")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 4 experts, vocab 256 (smoke test)")
    p.add_argument("--gpu-budget-gib", type=float, default=24.0,
                   help="GPU memory budget for the full model in GiB (default 24)")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES,
                   help=f"comma-separated, run in this order (default {DEFAULT_BATCH_SIZES})")
    p.add_argument("--stop-after-ok", type=int, default=0,
                   help="stop after this many batch sizes ran ok (0: run them all); 1 with a descending list "
                        "measures the largest that fits")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence (default 256)")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens per sequence (default 32)")
    p.add_argument("--experts-implementation", default="eager",
                   help="transformers experts implementation (default eager: under ZeRO-3 the library's default, "
                        "grouped_mm, ran out of a 24 GiB budget at every batch from 128 to 320 on the H200, "
                        "2026-12-03; at 128 it asked for 56 GiB in one allocation)")
    p.add_argument("--zero-override", default=None,
                   help='JSON merged into the config\'s zero_optimization, e.g. \'{"stage3_prefetch_bucket_size": 1e9}\'')
    p.add_argument("--no-pin-memory", action="store_true", help="offload_param.pin_memory false (pageable host store)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no batch size that would end after this many seconds from the start (the rest "
                        "are recorded as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu: DeepSpeed's CPU accelerator (gloo), for --tiny smoke tests")
    p.add_argument("--output", default=None,
                   help=f"JSON output (a CSV is written beside it); default $OUT/{NAME}.json if $OUT is set, "
                        f"else benchmarks/results/{NAME}_<date>.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config and memory arithmetic (pure: no DeepSpeed, no GPU)

def build_ds_config(config, pin_memory: bool = True, overrides: dict | None = None) -> dict:
    """ZeRO-Inference: ZeRO-3 with parameters offloaded to (pinned) CPU memory, bf16, no optimizer. The
    zero_optimization values are DeepSpeedExamples' zero_inference recipe for a model of hidden size h."""
    h = int(config.hidden_size)
    zero = {
        "stage": 3,
        "stage3_prefetch_bucket_size": 2 * h * h,
        "stage3_param_persistence_threshold": h,
        "stage3_max_live_parameters": 2 * h * h,
        "offload_param": {"device": "cpu", "pin_memory": bool(pin_memory)},
    }
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(zero.get(k), dict):
            zero[k] = {**zero[k], **v}
        else:
            zero[k] = int(v) if isinstance(v, float) and v.is_integer() else v
    return {
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from the model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def host_store_bytes(shapes: dict, persistence_threshold: int, pinned: bool, elem_bytes: int = 2) -> dict:
    """Bytes of DeepSpeed's host store: parameters above the persistence threshold live there (the rest stay
    on the GPU); pinned blocks come from torch's caching host allocator, which rounds to a power of two."""
    import math

    weights = offloaded = store = 0
    for shape in shapes.values():
        n = math.prod(shape)
        weights += n * elem_bytes
        if n > persistence_threshold:
            offloaded += n * elem_bytes
            store += next_pow2(n * elem_bytes) if pinned else n * elem_bytes
    return dict(weights_total_bytes=weights, weights_offloaded_bytes=offloaded, host_store_bytes_est=store)


def kv_bytes(config, batch: int, tokens: int, layers: int) -> int:
    return batch * tokens * 2 * config.num_key_value_heads * _head_dim(config) * 2 * layers


def gpu_cap_bytes(config, full_layers: int, batch: int, prompt_len: int, gen_len: int, budget_full: float) -> float:
    """The budget less the KV cache of the layers not built."""
    missing = full_layers - config.num_hidden_layers
    return budget_full - kv_bytes(config, batch, prompt_len + gen_len, missing)


def mem_available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from runtime.probe import cpu_memory_bytes
    return cpu_memory_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# model

def init_single_process(use_cuda: bool):
    """One rank, no launcher: the env:// rendezvous on the loopback, then deepspeed.init_distributed()."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1")):
        os.environ.setdefault(k, v)
    import deepspeed

    if use_cuda:
        import torch
        torch.cuda.set_device(0)
    deepspeed.init_distributed()
    return deepspeed


def build_engine(deepspeed, config, ds_config: dict, seed: int, use_cuda: bool) -> tuple:
    """(engine, timings): the model created under zero.Init (via HfDeepSpeedConfig), filled with random
    bf16 values in place, wrapped by deepspeed.initialize."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from runtime.synthetic import _Filler   # our runtime's synthetic generator: GPU chunks or a tiled block

    times = {}
    t = time.perf_counter()
    hf_ds = HfDeepSpeedConfig(ds_config)    # must stay alive: transformers reads it through a weak reference
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model._peer_hf_ds_config = hf_ds        # keep it alive as long as the model
    times["construct_s"] = time.perf_counter() - t
    not_zero = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if not_zero:
        raise RuntimeError(f"zero.Init did not partition {len(not_zero)} parameters (e.g. {not_zero[0]})")

    t = time.perf_counter()
    filler = _Filler(seed, torch.bfloat16)
    filler.cuda = use_cuda
    groups = [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    with torch.no_grad():
        for prefix, layer in groups:
            named = [(prefix + n, p) for n, p in layer.named_parameters()]
            _fill_gathered(deepspeed, filler, named)
        for n, p in rest:
            _fill_gathered(deepspeed, filler, [(n, p)])
    if use_cuda:
        torch.cuda.synchronize()
    times["fill_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    times["initialize_s"] = time.perf_counter() - t
    return engine, times


def _fill_gathered(deepspeed, filler, named: list) -> None:
    if not named:
        return
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
        for name, p in named:
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                filler.fill(p.data, name)


def zero_placement(model) -> dict:
    """Parameter bytes in DeepSpeed's host store and persistent on the GPU."""
    total = offloaded = 0
    for p in model.parameters():
        b = int(p.ds_numel) * p.element_size()
        total += b
        if not getattr(p, "ds_persist", False):
            offloaded += b
    return dict(weights_total_bytes=total, weights_offloaded_bytes=offloaded,
                weights_persistent_gpu_bytes=total - offloaded)


# ---------------------------------------------------------------------------------------------------
# measurement

def _is_oom(e: BaseException) -> bool:
    import torch

    s = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in s or "alloc_failed" in s


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def recover(engine, use_cuda: bool) -> None:
    """After a failed generate: release every gathered parameter and reset ZeRO-3's fetch schedule."""
    import torch

    engine.empty_partition_cache()
    coord = getattr(engine.optimizer, "get_param_coordinator", None)
    if coord is not None:
        coord().reset_step()
    gc.collect()
    if use_cuda:
        torch.cuda.empty_cache()


def environment(use_cuda: bool) -> dict:
    import deepspeed
    import torch
    import transformers

    from runtime.probe import cpu_memory_bytes, cpu_name

    env = dict(host=platform.node(), cpu=cpu_name(), cpu_cores=os.cpu_count(), cpu_memory_bytes=cpu_memory_bytes(),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda or "",
               transformers=transformers.__version__, deepspeed=deepspeed.__version__,
               deepspeed_accelerator=deepspeed.get_accelerator()._name,
               gpu=torch.cuda.get_device_name(0) if use_cuda else "none")
    if use_cuda:
        env["gpu_memory_bytes"] = torch.cuda.mem_get_info(0)[1]
    return env


CSV_FIELDS = ("date", "machine", "tag", "model", "num_layers", "full_layers", "batch_size", "prompt_len", "gen_len",
              "status", "tokens_per_s", "tokens_per_s_scaled_to_full", "wall_s", "prefill_s", "decode_tokens_per_s",
              "generated_tokens", "gpu_budget_full_bytes", "gpu_cap_bytes", "kv_bytes", "weights_total_bytes",
              "weights_offloaded_bytes", "host_store_bytes_est", "peak_gpu_bytes", "peak_host_rss_bytes",
              "stream_bytes_per_s_est", "pin_memory", "experts_implementation", "torch", "transformers",
              "deepspeed", "error", "command")


def write_results(path: Path, header: dict, rows: list[dict]) -> None:
    hf.write_results(path, header, rows, CSV_FIELDS, "deepspeed", tag=TAG)


def peak_host_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fail(msg: str, code: int = 2) -> int:
    print(f"{NAME}: {msg}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        return fail("--device cuda but torch sees no CUDA device")
    use_cuda = has_cuda if args.device == "auto" else args.device == "cuda"
    if not use_cuda and not args.tiny and args.device != "cpu":
        return fail("no CUDA device: ZeRO-Inference offloads to a GPU (run --tiny, or --device cpu for DeepSpeed's "
                    "CPU accelerator)")
    try:
        overrides = json.loads(args.zero_override) if args.zero_override else {}
    except json.JSONDecodeError as e:
        return fail(f"--zero-override is not JSON: {e}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    config, full_layers = build_config(args)
    ds_config = build_ds_config(config, pin_memory=not args.no_pin_memory, overrides=overrides)
    zero = ds_config["zero_optimization"]
    pinned = bool(zero["offload_param"].get("pin_memory")) and use_cuda
    store = host_store_bytes(param_shapes(config), int(zero["stage3_param_persistence_threshold"]), pinned)
    avail = mem_available_bytes()
    print(f"{config.num_hidden_layers}-layer model: {store['weights_total_bytes'] / GiB:.2f} GiB bf16, host store "
          f"~{store['host_store_bytes_est'] / GiB:.2f} GiB{' pinned' if pinned else ''}, "
          f"{avail / GiB:.1f} GiB available", file=sys.stderr)
    if store["host_store_bytes_est"] + HOST_RESERVE_BYTES > avail:
        return fail(f"the host store (~{store['host_store_bytes_est'] / GiB:.1f} GiB) and "
                    f"{HOST_RESERVE_BYTES / GiB:.0f} GiB for the process do not fit in {avail / GiB:.1f} GiB "
                    "of available host memory; pass --num-layers")
    try:
        deepspeed = init_single_process(use_cuda)
    except ImportError as e:
        return fail(f"cannot import deepspeed ({e}); install the carried wheels: "
                    "python -m pip install --no-index --no-deps .whl/deepspeed/*.whl")
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    out = Path(args.output) if args.output else hf.default_output(NAME)
    env = environment(use_cuda)
    header = dict(benchmark=NAME, tag=TAG, date=dt.date.today().isoformat(),
                  timestamp=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=shlex.join(["PYTHONPATH=.", "python", "benchmarks/peer_deepspeed.py",
                                      *(sys.argv[1:] if argv is None else argv)]),
                  environment=env, model=hf.model_header(args, config, full_layers),
                  workload=dict(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_sizes=batch_sizes,
                                gpu_budget_full_gib=args.gpu_budget_gib, stop_after_ok=args.stop_after_ok),
                  ds_config=ds_config, host_memory_available_bytes=avail, **store)
    print(f"building under zero.Init (DeepSpeed {env['deepspeed']}, accelerator {env['deepspeed_accelerator']}) ...",
          file=sys.stderr)
    t_build = time.perf_counter()
    try:
        engine, times = build_engine(deepspeed, config, ds_config, args.seed, use_cuda)
    except Exception as e:                                        # noqa: BLE001 (recorded, then the traceback)
        header.update(build_error=_one_line(e), elapsed_s=time.perf_counter() - T0,
                      peak_host_rss_after_build_bytes=peak_host_rss())
        write_results(out, header, [])
        print(f"{NAME}: the build failed: {header['build_error']} (wrote {out})", file=sys.stderr)
        raise
    model = engine.module
    header.update(build_s=time.perf_counter() - t_build, build_times=times, startup_s=t_build - T0,
                  peak_host_rss_after_build_bytes=peak_host_rss(),
                  experts_implementation=getattr(config, "_experts_implementation", None))
    header.update(zero_placement(model))
    print(f"built in {header['build_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in times.items())}); "
          f"{header['weights_offloaded_bytes'] / GiB:.2f} GiB offloaded", file=sys.stderr)

    total_gpu = torch.cuda.mem_get_info(0)[1] if use_cuda else 0
    t = time.perf_counter()
    hf.generate_once(model, 1, 8, 2, device, args.seed, inference_mode=False)   # CUDA context, kernels, ZeRO-3's trace
    header["warmup_s"] = time.perf_counter() - t
    per_forward_s = header["warmup_s"] / 2
    write_results(out, header, [])

    rows: list[dict] = []
    ok = 0
    last_cost = None
    for batch in batch_sizes:
        row = dict(model=Path(args.config).stem + ("-tiny" if args.tiny else ""), num_layers=config.num_hidden_layers,
                   full_layers=full_layers, batch_size=batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                   gpu_budget_full_bytes=args.gpu_budget_gib * GiB, pin_memory=pinned,
                   experts_implementation=header["experts_implementation"],
                   weights_total_bytes=header["weights_total_bytes"],
                   weights_offloaded_bytes=header["weights_offloaded_bytes"],
                   host_store_bytes_est=store["host_store_bytes_est"],
                   kv_bytes=kv_bytes(config, batch, args.prompt_len + args.gen_len, config.num_hidden_layers))
        if args.stop_after_ok and ok >= args.stop_after_ok:
            rows.append({**row, "status": "skipped", "error": f"{ok} batch size(s) ran ok (--stop-after-ok)"})
            write_results(out, header, rows)
            continue
        # a prefill-only generate and the timed one: (1 + gen_len) forward passes, each fetching every weight
        need = last_cost if last_cost is not None else 1.15 * (args.gen_len + 2) * per_forward_s
        elapsed = time.perf_counter() - T0
        if args.time_limit_s is not None and elapsed + need > args.time_limit_s:
            rows.append({**row, "status": "skipped",
                         "error": f"time limit {args.time_limit_s:g} s: {elapsed:.0f} s elapsed, ~{need:.0f} s needed"})
            write_results(out, header, rows)
            continue
        cap = gpu_cap_bytes(config, full_layers, batch, args.prompt_len, args.gen_len, args.gpu_budget_gib * GiB)
        row["gpu_cap_bytes"] = cap
        t_row = time.perf_counter()
        try:
            if use_cuda:
                torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, cap / total_gpu)), 0)
                torch.cuda.reset_peak_memory_stats(0)
            # no_grad, not inference_mode: ZeRO-3's hooks swap parameter storage during the forward
            run = dict(device=device, seed=args.seed + batch, inference_mode=False)
            prefill_s, _ = hf.generate_once(model, batch, args.prompt_len, 1, **run)
            wall, new = hf.generate_once(model, batch, args.prompt_len, args.gen_len, **run)
            tok_s = batch * new / wall
            decode_s = wall - prefill_s
            row.update(status="ok", wall_s=wall, generated_tokens=batch * new, tokens_per_s=tok_s, prefill_s=prefill_s,
                       decode_tokens_per_s=batch * (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
                       tokens_per_s_scaled_to_full=tok_s * config.num_hidden_layers / full_layers,
                       # one forward pass per new token (the first is the prefill), each fetches the host store
                       stream_bytes_per_s_est=header["weights_offloaded_bytes"] * new / wall if use_cuda else 0.0)
            ok += 1
            last_cost = 1.1 * (time.perf_counter() - t_row)
            print(f"batch {batch}: {tok_s:.2f} tok/s ({batch * new} tokens in {wall:.1f} s, prefill {prefill_s:.1f} s)",
                  file=sys.stderr)
        except Exception as e:                                    # noqa: BLE001 (recorded per batch size)
            status = "oom" if _is_oom(e) else "error"
            row.update(status=status, error=_one_line(e))
            print(f"batch {batch}: {status}: {row['error']}", file=sys.stderr)
        finally:
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(0) if use_cuda else 0
            row["peak_host_rss_bytes"] = peak_host_rss()
            row["row_s"] = time.perf_counter() - t_row
            if use_cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
        if row["status"] != "ok":
            try:
                recover(engine, use_cuda)
            except Exception as e:                                # noqa: BLE001
                rows.append(row)
                header["aborted"] = f"could not recover after batch {batch}: {_one_line(e)}"
                print(f"{NAME}: {header['aborted']}", file=sys.stderr)
                break
        rows.append(row)
        write_results(out, header, rows)
    header["elapsed_s"] = time.perf_counter() - T0
    write_results(out, header, rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
