"""Arguments shared by subcommands: which model, which machine, which workload."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hrm.units import format_seconds, format_size

fmt_s, fmt_bytes = format_seconds, format_size      # the CLI's names for them

DEFAULT_MODEL = "mixtral-8x7b"
DEFAULT_HARDWARE = "t4-s1"
# MTBench as the paper uses it: prompts average 77 tokens, the longest 418
DEFAULT_PROMPT_LEN = 77
DEFAULT_MAX_PROMPT_LEN = 418
DEFAULT_GEN_LEN = 128


def value(kind=float, *, positive: bool = True, low: float = 0.0, high: float | None = None):
    """An argparse type: a finite number of `kind` (int: an integer) in range; a bad one is argparse's
    one-line usage error naming the flag."""
    from hrm.checks import number

    def parse(text: str):
        try:
            v = int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return number(v, "value", integer=kind is int, positive=positive, low=low, high=high)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind.__name__
    return parse


COUNT = value(int)                                   # sequences, tokens, layers: 1 or more
FRACTION = value(float, positive=False, high=1.0)    # a share in [0, 1]
SHARE = value(float, high=1.0)                       # a share in (0, 1]


def size(text: str) -> str:
    """An argparse type for a memory size ('24GiB'): checked here, passed on as written."""
    from hrm.checks import MAX_BYTES
    from hrm.units import parse_size

    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"memory size {text!r} is more than 1 EiB")
    return text


def check_outputs(*paths) -> None:
    """Refuse, before any work, an output path that is a directory or in a directory not writable."""
    from hrm.atomic import check_writable
    for path in paths:
        if path:
            check_writable(path)


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, machine and workload")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name, path to a HF config.json / model directory, or a Hub id in the "
                        f"local Hugging Face cache (default {DEFAULT_MODEL})")
    g.add_argument("--download", action="store_true",
                   help="fetch a Hub id's config.json when it is not in the local cache (default: offline)")
    g.add_argument("--hardware", default=DEFAULT_HARDWARE,
                   help=f"built-in hardware profile, path to a .toml, or auto: this machine's GPU, host memory "
                        f"and cores, with the rates of the built-in profile of its GPU (default {DEFAULT_HARDWARE})")
    g.add_argument("--prompt-len", type=value(), default=DEFAULT_PROMPT_LEN,
                   help=f"average prompt length in tokens (default {DEFAULT_PROMPT_LEN})")
    g.add_argument("--max-prompt-len", type=COUNT, default=None,
                   help=f"longest prompt (default {DEFAULT_MAX_PROMPT_LEN} with the default prompt length, else the average)")
    g.add_argument("--gen-len", type=COUNT, default=DEFAULT_GEN_LEN, help=f"tokens generated per sequence (default {DEFAULT_GEN_LEN})")
    g.add_argument("--padded", action="store_true", help="pad every prompt to the longest (default: packed)")
    g.add_argument("--num-layers", type=COUNT, default=None, help="evaluate the model with only this many layers")
    from hrm.spec import DTYPE_BYTES
    dtypes = sorted(DTYPE_BYTES)
    g.add_argument("--weight-dtype", choices=dtypes, default=None, metavar="DTYPE",
                   help="what-if: every weight, experts included, stored as DTYPE (replaces the config's "
                        f"torch_dtype and quantization_config for the bytes; compute stays): {', '.join(dtypes)}")
    g.add_argument("--kv-dtype", choices=dtypes, default=None, metavar="DTYPE",
                   help="the KV cache stored as DTYPE (default: the model's compute dtype); int8 and fp8 "
                        "(float8_e4m3fn) with one fp32 scale per token and kv head, symmetric round to nearest, "
                        "which the runtime stores and reads; the others are what-ifs")
    add_expert_dtype_arg(g, "; plan also prints each format's own best plan")


KV_DTYPE_FORMATS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32",
                    "float32": "fp32", "int8": "int8", "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8"}
"""--kv-dtype names that are hrm.formats KV formats (int8 and fp8 with one fp32 scale per token and kv head);
the other names (int4, mxfp4) are what-ifs of bytes only."""


def add_kv_dtype_arg(g, more: str = "") -> None:
    """--kv-dtype for the commands that run the model (run, generate): the formats the runtime stores."""
    from hrm.formats import KV_FORMATS
    g.add_argument("--kv-dtype", choices=list(KV_FORMATS), default=None, metavar="FORMAT",
                   help="the KV cache stored as FORMAT (int8, fp8: one fp32 scale per token and kv head, "
                        f"symmetric round to nearest; default the compute dtype){more}: {', '.join(KV_FORMATS)}")


def add_expert_dtype_arg(g, more: str = "") -> None:
    from hrm.formats import EXPERT_FORMATS
    g.add_argument("--expert-dtype", choices=list(EXPERT_FORMATS), default=None, metavar="FORMAT",
                   help="the routed experts stored as FORMAT, scales included (int8: one per output channel; "
                        f"int4: one per 128 inputs; the runtime quantizes at load, round to nearest){more}: "
                        f"{', '.join(EXPERT_FORMATS)}")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """The memory budgets plans are held to (plan searches within them, estimate checks against them)."""
    g = p.add_argument_group("budgets")
    g.add_argument("--gpu-memory", metavar="SIZE", default=None, type=size,
                   help="memory of each GPU the process may use in all, CUDA context included (e.g. 16GiB, "
                        "24GB); default: the profile's memory x --gpu-frac")
    g.add_argument("--cpu-memory", metavar="SIZE", default=None, type=size,
                   help="host memory the process may use in all (e.g. 100GB); default: what this machine has "
                        "available when the profile is its own, else the profile's x --cpu-frac")
    g.add_argument("--gpu-frac", type=SHARE, default=None,
                   help="share of the profile's GPU memory to use (default 1; not with --gpu-memory)")
    g.add_argument("--cpu-frac", type=SHARE, default=None,
                   help="share of the profile's host memory to use (default 0.9, or what is available on the "
                        "profiled machine itself; not with --cpu-memory)")


def budgets_of(args, hw):
    """optimizer.space.Budgets of the budget arguments for this machine."""
    from optimizer.space import Budgets
    return Budgets.from_hardware(hw, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                                 gpu_frac=args.gpu_frac, cpu_frac=args.cpu_frac)


def model_arg(name: str, download: bool = False):
    """The ModelSpec of --model (a built-in name, a config path or directory, a Hub id); an error in a
    config file names the file."""
    from hrm.hf_config import load_model
    from hrm.spec import SpecError
    from moe_lightning.hub import resolve_model

    where = resolve_model(name, download=download)
    try:
        return load_model(where)
    except SpecError as e:
        if Path(where).exists() and str(where) not in str(e):
            raise SpecError(f"{where}: {e}") from None
        raise


def build_target(args):
    """(ModelSpec, HardwareProfile, Workload) from parsed arguments."""
    from hrm.checks import check_context
    from hrm.hardware import load_profile
    from hrm.spec import Workload

    spec = model_arg(args.model, download=args.download)
    if args.num_layers is not None:
        spec = spec.with_layers(args.num_layers)
    kv = KV_DTYPE_FORMATS.get(args.kv_dtype)           # a format the runtime stores: its scales priced too
    if args.weight_dtype is not None or (args.kv_dtype is not None and kv is None):
        spec = spec.with_dtypes(spec.dtypes.stored_as(weight=args.weight_dtype, kv=None if kv else args.kv_dtype))
    if kv is not None:
        spec = spec.with_kv_format(kv)
    if args.expert_dtype is not None:
        spec = spec.with_expert_format(args.expert_dtype)
    if args.hardware == "auto":
        from moe_lightning.machine import auto_profile
        hw, _ = auto_profile()
    else:
        hw = load_profile(args.hardware)
    max_len = args.max_prompt_len
    if max_len is None:
        max_len = DEFAULT_MAX_PROMPT_LEN if args.prompt_len == DEFAULT_PROMPT_LEN else int(round(args.prompt_len))
    workload = Workload(float(args.prompt_len), int(max_len), int(args.gen_len), padded=bool(args.padded))
    check_context(spec, workload.max_prompt_len, workload.gen_len)
    return spec, hw, workload


def hardware_line(hw) -> str | None:
    """For --hardware auto, what was detected and which profile's rates are used; else None."""
    return f"hardware auto: {hw.description}" if hw.name.startswith("auto:") else None


def storage_line(spec) -> str:
    """The weights and KV cache an answer prices, and how they are stored."""
    d = spec.dtypes
    experts = spec.num_moe_layers * spec.num_experts * spec.expert_bytes
    how = f"; stored as {d.quantization}" if d.quantization else ""
    return (f"weights {fmt_bytes(spec.weight_bytes)} (routed experts {fmt_bytes(experts)} at "
            f"{d.expert_weight_bytes:.4g} B/param, the rest at {d.weight_bytes:.4g}), KV {d.kv_bytes:.4g} B/element, "
            f"compute {d.name}{how}")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=_default))


def _default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__dict__"):
        return o.__dict__
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
