"""Peer: HF transformers + accelerate CPU offload, the path most users take for a model larger than the GPU.

A Mixtral-shaped model (our registry's config, optionally with fewer layers) with random bf16 weights is
built on the meta device, materialised in host memory (values drawn on the GPU in chunks, or tiled from
one random block on the CPU), placed by `accelerate.infer_auto_device_map(max_memory=...)` and
`accelerate.dispatch_model` (decoder layers that do not fit stay on the CPU and are copied to the GPU on
every forward), and timed with `model.generate` (greedy, exactly gen_len new tokens) for each batch size.

GPU budget (per batch size; all numbers recorded in the output):
  budget        --gpu-budget-gib, for the full model (all of the config's layers)
  reserve       KV cache (full model) + prefill activations + 1 GiB slack
  resident      budget - reserve - one decoder layer (accelerate keeps room to stream one offloaded layer)
  with --num-layers L < full:  resident is scaled by L / full and the KV by L / full, so the model holds
  the same fraction of its weights on the GPU as the full model would; max_memory[0] = resident + layer.
  The whole run is capped at max_memory[0] + reserve(L) with torch.cuda.set_per_process_memory_fraction,
  so exceeding the budget is an OOM, recorded per batch size.
tokens/s = batch * gen_len / wall time of generate (CUDA synchronised), prefill included; prefill_s is a
separate generate of one token, decode tokens/s = batch * (gen_len - 1) / (wall - prefill_s).

  PYTHONPATH=. python benchmarks/peer_hf_accelerate.py --num-layers 8 --gpu-budget-gib 24 \
      --batch-sizes 16,64,256 --prompt-len 256 --gen-len 32
  PYTHONPATH=. python benchmarks/peer_hf_accelerate.py --tiny        # CPU smoke test, seconds
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "hrm" / "configs" / "mixtral-8x7b.json"
GiB = 2 ** 30
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256,
            max_position_embeddings=1024)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="HF config.json (default: Mixtral-8x7B)")
    p.add_argument("--num-layers", type=int, default=None, help="build only this many decoder layers")
    p.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers, 4 experts, vocab 256 (smoke test)")
    p.add_argument("--gpu-budget-gib", type=float, default=24.0,
                   help="GPU memory budget for the full model in GiB (default 24); scaled with --num-layers")
    p.add_argument("--batch-sizes", default="16,64,256", help="comma-separated (default 16,64,256)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per sequence (default 256)")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens per sequence (default 32)")
    p.add_argument("--experts-implementation", default=None,
                   help="transformers experts implementation (default: the library's own default)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="start no new batch size after this many seconds, and no timed generate that would end "
                        "after them by its prefill's time per forward pass (recorded as skipped)")
    p.add_argument("--stop-after-ok", type=int, default=0,
                   help="stop after this many batch sizes ran ok (0: run them all); 1 with a descending list "
                        "measures the largest that fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fill", choices=("cpu", "gpu"), default="cpu",
                   help="draw the random weights on the CPU (tiled from one block after a parallel first touch: "
                        "the default) or on the GPU in chunks (one copy at a time into pageable memory: slow, "
                        "~1.3 GB/s on the H200)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--output", default=None,
                   help="JSON output (a CSV is written beside it); default $OUT/peer_hf_accelerate.json if $OUT "
                        "is set, else benchmarks/results/peer_hf_accelerate_<date>.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# model

def build_config(args):
    from transformers import MixtralConfig

    raw = {k: v for k, v in json.loads(Path(args.config).read_text()).items()
           if not k.startswith("_") and k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    full_layers = int(TINY["num_hidden_layers"] if args.tiny else raw["num_hidden_layers"])
    if args.tiny:
        raw.update(TINY)
    if args.num_layers:
        raw["num_hidden_layers"] = args.num_layers
    config = MixtralConfig(**raw)
    config.dtype = "bfloat16"
    config.use_cache = True
    if args.experts_implementation:
        config._experts_implementation = args.experts_implementation
    return config, full_layers


def build_model(config, seed: int, fill_on_gpu: bool):
    """The model with random bf16 weights in host memory: parameters are created on the meta device and
    each is filled in place (no `normal_` over tens of GB on the CPU). On the CPU, each parameter's fresh
    pages are first touched by torch's parallel zero (every core faults its share: ~19 GB/s on the H200's
    host, `benchmarks/pin_rate.py`), then tiled from one random block."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import MixtralForCausalLM

    from runtime.synthetic import _Filler   # our runtime's synthetic generator: GPU chunks or a tiled block

    with init_empty_weights():                                   # parameters on meta, buffers real
        model = MixtralForCausalLM(config)
    filler = _Filler(seed, torch.bfloat16)
    filler.cuda = fill_on_gpu
    master = {}
    for name, param in list(model.named_parameters()):
        t = torch.empty(param.shape, dtype=torch.bfloat16)       # host memory, [shape of the parameter]
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            if not fill_on_gpu:
                t.zero_()
            filler.fill(t, name)
        set_module_tensor_to_device(model, name, "cpu", value=t, dtype=torch.bfloat16)
        master[name] = t
    if fill_on_gpu:
        torch.cuda.synchronize()
    model.eval()
    model.requires_grad_(False)
    return model, master


def restore_to_cpu(model, master: dict) -> None:
    """Undo a dispatch: remove accelerate's hooks and put every parameter back in host memory."""
    import torch
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    remove_hook_from_module(model, recurse=True)
    for name, t in master.items():
        set_module_tensor_to_device(model, name, "cpu", value=t, dtype=torch.bfloat16)
    model.to("cpu")                                              # buffers (rotary inv_freq)
    model.__dict__.pop("hf_device_map", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder_layer_bytes(model) -> int:
    layer = model.model.layers[0]
    return sum(p.numel() * 2 for p in layer.parameters())


# ---------------------------------------------------------------------------------------------------
# budget

def plan_memory(config, full_layers: int, batch: int, prompt_len: int, gen_len: int, budget_full: float,
                layer_bytes: int) -> dict:
    """GPU memory for one batch size, in bytes (see the module docstring)."""
    layers = config.num_hidden_layers
    head_dim = _head_dim(config)
    kv_per_layer = batch * (prompt_len + gen_len) * 2 * config.num_key_value_heads * head_dim * 2
    tokens = batch * prompt_len
    h, i, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    # prefill: routed tokens gathered per expert ([tokens*k, h] in, [tokens*k, 2i] gate/up, [tokens*k, i]
    # activation, [tokens*k, h] out) plus residual, norm, q/k/v and attention output of the batch
    act = tokens * k * (2 * h + 3 * i) * 2 + tokens * 8 * h * 2 + batch * config.vocab_size * 4
    slack = GiB
    reserve_full = kv_per_layer * full_layers + act + slack
    resident_full = max(0.0, budget_full - reserve_full - layer_bytes)
    resident = resident_full * layers / full_layers
    max_memory_gpu = resident + layer_bytes
    reserve = kv_per_layer * layers + act + slack
    return dict(kv_bytes=kv_per_layer * layers, activation_reserve_bytes=act, slack_bytes=slack,
                resident_budget_bytes=resident, max_memory_gpu_bytes=max_memory_gpu,
                # never above the whole budget: where the estimate leaves no room for weights, the run decides
                gpu_cap_bytes=min(max_memory_gpu + reserve, budget_full),
                gpu_budget_scaled_bytes=budget_full * layers / full_layers)


def decode_shortfall(prefill_peak_bytes: int, mem: dict, prompt_len: int, gen_len: int, layers: int) -> str:
    """Why decode would not fit under the cap, judged from the prefill's measured peak, or "". Decode adds
    the KV of gen_len tokens and, for one layer at a time, a copy of that layer's cache (DynamicCache grows by
    concatenation); the prefill's temporaries are gone by then, so this errs towards refusing. A whole-model
    generate takes ~8 minutes, nearly a device call: a batch that fits its prefill but not its decode would
    spend the call and leave no row."""
    growth = mem["kv_bytes"] * gen_len / (prompt_len + gen_len) + mem["kv_bytes"] / layers
    if prefill_peak_bytes + growth <= mem["gpu_cap_bytes"]:
        return ""
    return (f"not run: prefill peak {prefill_peak_bytes / GiB:.2f} GiB + decode KV growth {growth / GiB:.2f} GiB "
            f"> cap {mem['gpu_cap_bytes'] / GiB:.2f} GiB")


def dispatch(model, max_memory_gpu: float, cpu_bytes: float) -> dict:
    """Place the model as accelerate would for `max_memory={0: max_memory_gpu, "cpu": ...}` and attach
    its hooks; execution is always on GPU 0, offloaded blocks are copied there on every forward."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory={0: int(max_memory_gpu), "cpu": int(cpu_bytes)},
                                       no_split_module_classes=list(model._no_split_modules or []),
                                       dtype=torch.bfloat16)
    if not any(str(d) not in ("cpu", "disk") for d in device_map.values()):
        # nothing fits: accelerate would run the whole model on the CPU; keep the GPU executing and
        # stream every block (one entry per block, so one block at a time is on the GPU)
        blocks = [f"model.{n}" for n, _ in model.model.named_children() if n != "layers"]
        blocks += [f"model.layers.{i}" for i in range(len(model.model.layers))]
        blocks += [n for n, _ in model.named_children() if n != "model"]
        device_map = {b: "cpu" for b in blocks}
    dispatch_model(model, device_map=device_map, main_device=0, force_hooks=True)
    return device_map


def placement(master: dict, device_map: dict, num_layers: int) -> dict:
    """Decoder layers and weight bytes that the device map puts on the GPU."""
    on_gpu = [m for m, d in device_map.items() if str(d) not in ("cpu", "disk")]

    def on(name: str) -> bool:                 # module or parameter `name` lies under a GPU entry
        return any(m == "" or name == m or name.startswith(m + ".") for m in on_gpu)

    sizes = {name: t.numel() * t.element_size() for name, t in master.items()}
    return dict(layers_on_gpu=sum(on(f"model.layers.{i}") for i in range(num_layers)),
                weights_on_gpu_bytes=sum(s for n, s in sizes.items() if on(n)),
                weights_total_bytes=sum(sizes.values()),
                device_map={k: str(v) for k, v in device_map.items()})


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------------------------------
# measurement

def generate_once(model, batch: int, prompt_len: int, gen_len: int, device, seed: int,
                  inference_mode: bool = True) -> tuple[float, int]:
    """Wall seconds of one greedy generate of exactly gen_len new tokens over random prompts, and the tokens
    it made. inference_mode=False: under no_grad only (for hooks that swap parameter storage)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g)   # [batch, prompt]
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode() if inference_mode else torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, pad_token_id=0, use_cache=True)
    sync()
    wall = time.perf_counter() - t0
    return wall, int(out.shape[1] - prompt_len)


def measure(model, batch: int, args, device, prefill_s: float, layers: int, full_layers: int, offloaded_bytes: int,
            use_cuda: bool) -> dict:
    """The timed generate of one batch size: a row's measured columns."""
    import torch

    wall, new = generate_once(model, batch, args.prompt_len, args.gen_len, device, args.seed + batch)
    tok_s = batch * new / wall
    decode_s = wall - prefill_s
    return dict(status="ok", wall_s=wall, generated_tokens=batch * new, tokens_per_s=tok_s, prefill_s=prefill_s,
                decode_tokens_per_s=batch * (new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
                tokens_per_s_scaled_to_full=tok_s * layers / full_layers,
                # one forward pass per new token (the first is the prefill), each streams the offload
                stream_bytes_per_s_est=offloaded_bytes * new / wall if use_cuda else 0.0,
                peak_gpu_bytes=torch.cuda.max_memory_allocated(0) if use_cuda else 0)


def environment(use_cuda: bool) -> dict:
    import accelerate
    import torch
    import transformers

    from runtime.probe import cpu_name, cpu_memory_bytes

    env = dict(host=platform.node(), cpu=cpu_name(), cpu_cores=os.cpu_count(), cpu_memory_bytes=cpu_memory_bytes(),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda or "",
               transformers=transformers.__version__, accelerate=accelerate.__version__,
               gpu=torch.cuda.get_device_name(0) if use_cuda else "none")
    if use_cuda:
        env["gpu_memory_bytes"] = torch.cuda.mem_get_info(0)[1]
    return env


def default_output(name: str = "peer_hf_accelerate") -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"{name}.json"
    return REPO / "benchmarks" / "results" / f"{name}_{dt.date.today().isoformat()}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


CSV_FIELDS = ("date", "machine", "model", "num_layers", "full_layers", "batch_size", "prompt_len", "gen_len",
              "status", "tokens_per_s", "tokens_per_s_scaled_to_full", "wall_s", "prefill_s", "decode_tokens_per_s",
              "generated_tokens",
              "gpu_budget_full_bytes", "gpu_cap_bytes", "max_memory_gpu_bytes", "layers_on_gpu",
              "weights_on_gpu_bytes", "weights_total_bytes", "peak_gpu_bytes", "stream_bytes_per_s_est",
              "experts_implementation", "torch", "transformers", "accelerate", "error", "command")


def write_results(path: Path, header: dict, rows: list[dict], fields=CSV_FIELDS, library: str = "accelerate",
                  **constant) -> None:
    """The JSON (header and rows) and a CSV of `fields` beside it, each written atomically; every CSV row also
    gets the date, machine, command, the torch / transformers / `library` versions and `constant` columns."""
    _atomic_write(path, json.dumps({**header, "rows": rows}, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    env = header["environment"]
    for r in rows:
        w.writerow({**r, **constant, "date": header["date"], "machine": f"{env['gpu']} / {env['cpu']}",
                    "command": header["command"], "torch": env["torch"], "transformers": env["transformers"],
                    library: env[library]})
    _atomic_write(path.with_suffix(".csv"), buf.getvalue())


def model_header(args, config, full_layers: int) -> dict:
    """The model part of a peer's JSON header."""
    return dict(config=str(args.config), tiny=args.tiny, num_layers=config.num_hidden_layers, full_layers=full_layers,
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    config, full_layers = build_config(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    out = Path(args.output) if args.output else default_output()
    env = environment(use_cuda)

    weight_bytes_est = 2 * (config.vocab_size * config.hidden_size * 2 + config.num_hidden_layers * (
        config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
        + config.hidden_size * (config.num_attention_heads + 2 * config.num_key_value_heads) * _head_dim(config)
        + config.num_attention_heads * _head_dim(config) * config.hidden_size))
    if weight_bytes_est > 0.85 * env["cpu_memory_bytes"]:
        print(f"peer_hf_accelerate: {weight_bytes_est / GiB:.1f} GiB of weights do not fit in "
              f"{env['cpu_memory_bytes'] / GiB:.1f} GiB of host memory; pass --num-layers", file=sys.stderr)
        return 2

    header = dict(benchmark="peer_hf_accelerate", date=dt.date.today().isoformat(),
                  timestamp=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=shlex.join(["PYTHONPATH=.", "python", "benchmarks/peer_hf_accelerate.py",
                                      *(sys.argv[1:] if argv is None else argv)]),
                  environment=env, model=model_header(args, config, full_layers),
                  workload=dict(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_sizes=batch_sizes,
                                gpu_budget_full_gib=args.gpu_budget_gib))
    t_start = time.perf_counter()
    print(f"building {config.num_hidden_layers}-layer model ({weight_bytes_est / GiB:.2f} GiB bf16) ...", file=sys.stderr)
    model, master = build_model(config, args.seed, use_cuda and args.fill == "gpu")
    header["build_s"] = time.perf_counter() - t_start
    header["experts_implementation"] = getattr(config, "_experts_implementation", None)
    layer_bytes = decoder_layer_bytes(model)
    rows: list[dict] = []
    warmed, ok = False, 0
    for batch in batch_sizes:
        row = dict(model=Path(args.config).stem + ("-tiny" if args.tiny else ""), num_layers=config.num_hidden_layers,
                   full_layers=full_layers, batch_size=batch, prompt_len=args.prompt_len, gen_len=args.gen_len,
                   gpu_budget_full_bytes=args.gpu_budget_gib * GiB,
                   experts_implementation=header["experts_implementation"])
        skip = (f"{ok} batch size(s) ran ok (--stop-after-ok)" if args.stop_after_ok and ok >= args.stop_after_ok
                else f"time limit {args.time_limit_s:g} s reached"
                if args.time_limit_s is not None and time.perf_counter() - t_start > args.time_limit_s else "")
        if skip:
            rows.append({**row, "status": "skipped", "error": skip})
            write_results(out, header, rows)
            continue
        mem = plan_memory(config, full_layers, batch, args.prompt_len, args.gen_len, args.gpu_budget_gib * GiB,
                          layer_bytes)
        row.update(mem)
        try:
            if use_cuda:
                total = torch.cuda.mem_get_info(0)[1]
                torch.cuda.set_per_process_memory_fraction(min(1.0, mem["gpu_cap_bytes"] / total), 0)
                device_map = dispatch(model, mem["max_memory_gpu_bytes"], env["cpu_memory_bytes"])
            else:
                device_map = {"": "cpu"}
            row.update(placement(master, device_map, config.num_hidden_layers))
            if not warmed:                                        # CUDA context, kernels, hooks: one pass
                generate_once(model, 1, 8, 1, device, args.seed)
                warmed = True
            if use_cuda:
                torch.cuda.reset_peak_memory_stats(0)
            prefill_s, _ = generate_once(model, batch, args.prompt_len, 1, device, args.seed + batch)
            short = decode_shortfall(torch.cuda.max_memory_allocated(0), mem, args.prompt_len, args.gen_len,
                                     config.num_hidden_layers) if use_cuda else ""
            # the timed generate makes gen_len forward passes, each streaming what the prefill's one did
            need_s, elapsed_s = 1.1 * args.gen_len * prefill_s, time.perf_counter() - t_start
            if not short and args.time_limit_s is not None and elapsed_s + need_s > args.time_limit_s:
                short = f"time limit {args.time_limit_s:g} s: {elapsed_s:.0f} s elapsed, ~{need_s:.0f} s needed"
            if short:
                row.update(status="skipped", error=short, prefill_s=prefill_s,
                           peak_gpu_bytes=torch.cuda.max_memory_allocated(0))
                print(f"batch {batch}: {short}", file=sys.stderr)
            else:
                row.update(measure(model, batch, args, device, prefill_s, config.num_hidden_layers, full_layers,
                                   row["weights_total_bytes"] - row["weights_on_gpu_bytes"], use_cuda))
                ok += 1
                print(f"batch {batch}: {row['tokens_per_s']:.2f} tok/s ({row['generated_tokens']} tokens in "
                      f"{row['wall_s']:.1f} s, {row['layers_on_gpu']}/{config.num_hidden_layers} layers on the GPU)",
                      file=sys.stderr)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower() \
                    and "ALLOC_FAILED" not in str(e):
                raise
            row.update(status="oom", error=str(e).splitlines()[0][:300],
                       peak_gpu_bytes=torch.cuda.max_memory_allocated(0) if use_cuda else 0)
            print(f"batch {batch}: out of GPU memory", file=sys.stderr)
        finally:
            if use_cuda:
                restore_to_cpu(model, master)
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
        rows.append(row)
        write_results(out, header, rows)
    header["elapsed_s"] = time.perf_counter() - t_start
    write_results(out, header, rows)
    print(f"wrote {out} and {out.with_suffix('.csv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
