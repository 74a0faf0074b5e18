"""The fastest of several settings of the fused CPU attention (runtime/cpu_attention_fused.py), from
benchmarks/cpu_attention_rate.py results each measured in its own process with other settings (environment
variables): a table of ms per call by setting and shape on stderr, and on stdout the `export` lines of the
fastest (least ms summed over every fused row it shares with the others), for a shell to eval.

    eval "$(python benchmarks/fused_variant.py attn-base.json attn-wide.json attn-pf16.json)"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.cpu_attention_fused import SETTINGS_ENV  # noqa: E402



def fused_ms(result: dict) -> dict[tuple, float]:
    """(format, batch, ctx) -> ms per call of the fused kernel's rows."""
    return {(r["format"], r["batch"], r["ctx"]): r["ms_per_call"] for r in result["rows"] if r["kernel"] == "fused"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="cpu_attention_rate.py --out files")
    args = p.parse_args(argv)
    runs = []
    for path in args.results:
        try:
            result = json.loads(path.read_text())
            runs.append((path.stem, result["fused_settings"], fused_ms(result)))
        except (OSError, ValueError, KeyError) as e:
            print(f"fused_variant: {path}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
    shared = set.intersection(*(set(ms) for _, _, ms in runs)) if runs else set()
    if not shared:
        print("fused_variant: no fused rows shared by the results; nothing chosen", file=sys.stderr)
        return 1
    shapes = sorted(shared)
    print("setting".ljust(28) + "".join(f"{f} {b}x{t}".rjust(16) for f, b, t in shapes) + "total ms".rjust(12),
          file=sys.stderr)
    totals = {}
    for name, settings, ms in runs:
        totals[name] = sum(ms[s] for s in shapes)
        label = f"{name} ({settings['vector_bits']}b pf{settings['prefetch_slots']} {settings['inline']})"
        print(label.ljust(28) + "".join(f"{ms[s]:16.2f}" for s in shapes) + f"{totals[name]:12.2f}", file=sys.stderr)
    best = min(totals, key=totals.get)
    settings = next(s for name, s, _ in runs if name == best)
    print(f"fastest: {best}", file=sys.stderr)
    for key, var in SETTINGS_ENV.items():
        print(f"export {var}={settings[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
