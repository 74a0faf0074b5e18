"""Slow reference implementations the tests compare fast paths against."""
import math

import torch


def naive_decode_attention(q, k, v, starts, ends):
    """One query per sequence over its slots [starts[b], ends[b]), head by head in float64.
    q [B, n_q, d]; k, v [B, n_kv, T, d] -> [B, n_q * d]."""
    b, n_q, d = q.shape
    group = n_q // k.shape[1]
    out = torch.zeros(b, n_q, d, dtype=torch.float64)
    for i in range(b):
        for h in range(n_q):
            keys = k[i, h // group, starts[i]:ends[i]].double()            # [ctx, d]
            vals = v[i, h // group, starts[i]:ends[i]].double()
            w = torch.softmax(keys @ q[i, h].double() / math.sqrt(d), dim=0)
            out[i, h] = w @ vals
    return out.reshape(b, n_q * d)


def bare_profile(name: str):
    """A built-in hardware profile whose process takes no memory of its own (no CUDA context, no
    interpreter baseline, no allocator slack): for tiny models under budgets of kilobytes."""
    from dataclasses import replace

    from hrm.hardware import load_profile
    from hrm.memory import MemoryProfile

    return replace(load_profile(name), memory=MemoryProfile(0.0, 0.0, 0.0, source="none (tests)"))


def bare_profile_file(name: str, directory) -> str:
    """bare_profile as a TOML file in `directory` (for scripts that take a profile path)."""
    from pathlib import Path

    from hrm.hardware import load_profile

    text = Path(load_profile(name).path).read_text()
    path = Path(directory) / f"{name}-bare.toml"
    path.write_text(text + '\n[memory]\ncuda_context_gib = 0\nprocess_baseline_gib = 0\ngpu_allocator_frac = 0\n'
                           'source = "none (tests)"\n')
    return str(path)
