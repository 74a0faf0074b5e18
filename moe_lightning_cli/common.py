"""Arguments shared by subcommands: which model, which machine, which workload."""
from __future__ import annotations

import argparse
import json

from hrm.units import format_seconds as fmt_s, format_size as fmt_bytes  # noqa: F401  (the CLI's names)

DEFAULT_MODEL = "mixtral-8x7b"
DEFAULT_HARDWARE = "t4-s1"
# MTBench as the paper uses it: prompts average 77 tokens, the longest 418
DEFAULT_PROMPT_LEN = 77
DEFAULT_MAX_PROMPT_LEN = 418
DEFAULT_GEN_LEN = 128


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, machine and workload")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name, path to a HF config.json / model directory, or a Hub id in the "
                        f"local Hugging Face cache (default {DEFAULT_MODEL})")
    g.add_argument("--download", action="store_true",
                   help="fetch a Hub id's config.json when it is not in the local cache (default: offline)")
    g.add_argument("--hardware", default=DEFAULT_HARDWARE,
                   help=f"built-in hardware profile or path to a .toml (default {DEFAULT_HARDWARE})")
    g.add_argument("--prompt-len", type=float, default=DEFAULT_PROMPT_LEN,
                   help=f"average prompt length in tokens (default {DEFAULT_PROMPT_LEN})")
    g.add_argument("--max-prompt-len", type=int, default=None,
                   help=f"longest prompt (default {DEFAULT_MAX_PROMPT_LEN} with the default prompt length, else the average)")
    g.add_argument("--gen-len", type=int, default=DEFAULT_GEN_LEN, help=f"tokens generated per sequence (default {DEFAULT_GEN_LEN})")
    g.add_argument("--padded", action="store_true", help="pad every prompt to the longest (default: packed)")
    g.add_argument("--num-layers", type=int, default=None, help="evaluate the model with only this many layers")


def build_target(args):
    """(ModelSpec, HardwareProfile, Workload) from parsed arguments."""
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from hrm.spec import Workload
    from moe_lightning.hub import resolve_model

    spec = load_model(resolve_model(args.model, download=args.download))
    if args.num_layers:
        spec = spec.with_layers(args.num_layers)
    hw = load_profile(args.hardware)
    max_len = args.max_prompt_len
    if max_len is None:
        max_len = DEFAULT_MAX_PROMPT_LEN if args.prompt_len == DEFAULT_PROMPT_LEN else int(round(args.prompt_len))
    workload = Workload(float(args.prompt_len), int(max_len), int(args.gen_len), padded=bool(args.padded))
    return spec, hw, workload


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
