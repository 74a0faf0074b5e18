"""Leave one out: the committed whole-model H200 runs predicted from hrm/hardware_profiles/h200.toml's
unit-level rates and the efficiency model (hrm/efficiency.py), none of whose fractions comes from those runs;
beside it today's figure (the same rates at their roofline, no efficiency model), the same with each source
of fractions left out, and the L4 profile's single-layer times against the paper's (FACTS.md, Fig. 9).

    python benchmarks/leave_one_out.py --out benchmarks/results/leave_one_out.json

The runs: calls 7-15 of 2026-12-02 (benchmarks/basis_error.py's), 26 whole-model runs of Mixtral-8x7B,
Qwen3-30B-A3B and OLMoE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from basis_error import summary  # noqa: E402
from reprice_whole_model import rows_of  # noqa: E402
from result_file import write_result  # noqa: E402
from hrm import efficiency, ops  # noqa: E402
from hrm.estimate import _cpu_attention_s  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Placement  # noqa: E402
from hrm.rates import Setting, cpu_attention_bytes_per_s, gpu_time, h2d_bytes_per_s  # noqa: E402
from hrm.spec import Workload  # noqa: E402

RUNS = [ROOT / "benchmarks/results/whole_model" / f"h200-2026-12-02-call{i}" for i in range(7, 16)]

# The MoE-Lightning paper's single-layer micro-benchmarks of its L4 host (Fig. 9, FACTS.md), seconds,
# one layer of Mixtral-8x7B: by micro-batch size mu (rows) and context (columns)
FIG9_MU = (32, 64, 128, 256)
FIG9_CTX = (128, 256, 512, 1024, 2048)
FIG9_KV = ((0.00141, 0.00274, 0.00546, 0.0109, 0.0218), (0.00274, 0.00546, 0.01090, 0.02176, 0.04351),
           (0.00546, 0.01092, 0.02178, 0.04350, 0.08699), (0.01089, 0.02177, 0.04349, 0.08697, 0.17388))
FIG9_ATTENTION = ((0.00044, 0.00067, 0.00173, 0.003, 0.00594), (0.00074, 0.00148, 0.00298, 0.00589, 0.0116),
                  (0.00157, 0.00298, 0.00632, 0.0114, 0.0232), (0.00371, 0.00673, 0.01178, 0.02206, 0.04458))
FIG9_FFN = (0.0122, 0.0123, 0.0125, 0.013)


def single_layer(hardware: str = "l4-s2") -> list[dict]:
    """The cost model's single-layer times of Mixtral-8x7B on `hardware` beside Fig. 9's: KV transfer
    (pinned CPU -> GPU), CPU attention (one call of mu sequences) and the MoE FFN on the GPU."""
    spec = load_model("mixtral-8x7b")
    s = Setting(spec, load_profile(hardware), Workload.uniform(256, 50), Placement())
    kv_token = spec.kv_elems_per_token_layer * spec.dtypes.kv_bytes
    out = []
    for i, mu in enumerate(FIG9_MU):
        for j, ctx in enumerate(FIG9_CTX):
            b = mu * ctx * kv_token
            out.append({"op": "kv_transfer", "mu": mu, "ctx": ctx, "paper_s": FIG9_KV[i][j],
                        "model_s": float(b / h2d_bytes_per_s(s, b))})
            rate = cpu_attention_bytes_per_s(s, 1, mu)
            out.append({"op": "cpu_attention", "mu": mu, "ctx": ctx, "paper_s": FIG9_ATTENTION[i][j],
                        "model_s": float(_cpu_attention_s(s, mu, ctx, 1, rate))})
        out.append({"op": "moe_ffn", "mu": mu, "ctx": None, "paper_s": FIG9_FFN[i], "model_s": float(
            gpu_time(s, ops.routed_experts(spec, mu), ops.tokens_per_expert(spec, mu)))})
    for r in out:
        r["err_pct"] = 100.0 * (r["model_s"] - r["paper_s"]) / r["paper_s"]
    return out


def priced(hw, use_measured=False, efficiency_model=True, without=()) -> list[dict]:
    with efficiency.without(*without):
        return [r for d in RUNS for r in rows_of(d, hw, use_measured, efficiency_model)]


def _median(rows, key_meas, key_now) -> float:
    return float(np.median([100.0 * (r[key_now] - r[key_meas]) / r[key_meas] for r in rows]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", default="h200", help="the unit-level profile to predict the runs from")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    hw = load_profile(args.hardware)
    today = priced(hw, efficiency_model=False)
    model = priced(hw)
    origins = sorted({f.origin for k, f in efficiency.FRACTIONS.items() if k in efficiency.NEUTRAL})   # that price
    left_out = {"+".join(o): summary([r["now_err_pct"] for r in priced(hw, without=o)])
                for o in [(o,) for o in origins] + [("h200-unit", "h200-runtime")]}
    result = {
        "today": summary([r["now_err_pct"] for r in today]),
        "efficiency_model": {**summary([r["now_err_pct"] for r in model]),
                             "signed_median_pct": float(np.median([r["now_err_pct"] for r in model])),
                             "prefill_signed_median_pct": _median(model, "meas_prefill_s", "now_prefill_s"),
                             "decode_signed_median_pct": _median(model, "meas_decode_s", "now_decode_s")},
        "left_out": left_out,
    }
    print(f"{len(model)} runs of calls 7-15 from {hw.name}'s unit-level rates")
    for name, s in (("today (roofline)", result["today"]), ("efficiency model", result["efficiency_model"])):
        print(f"  {name:17s}: |error| median {s['median_abs_pct']:.1f}%, 90th percentile {s['p90_abs_pct']:.1f}%, "
              f"max {s['max_abs_pct']:.1f}%")
    for name, s in left_out.items():
        print(f"  without {name:13s}: median {s['median_abs_pct']:.1f}%, 90th percentile {s['p90_abs_pct']:.1f}%")
    layer = single_layer()
    for op in ("kv_transfer", "cpu_attention", "moe_ffn"):
        e = np.abs([r["err_pct"] for r in layer if r["op"] == op])
        result.setdefault("l4_single_layer_summary", {})[op] = {"median_abs_pct": float(np.median(e)),
                                                                "max_abs_pct": float(e.max()), "points": int(e.size)}
        print(f"  l4-s2 {op:13s}: {e.size} points, |error| median {np.median(e):.1f}%, max {e.max():.1f}%")
    write_result(args.out, "leave_one_out.py", argv, hardware=hw.name, runs=[str(d.relative_to(ROOT)) for d in RUNS],
                 **result, rows=[{k: r[k] for k in ("folder", "run", "policy", "meas_tok_s", "now_tok_s", "now_err_pct",
                                                    "meas_prefill_s", "now_prefill_s", "meas_decode_s", "now_decode_s")}
                                 for r in model],
                 l4_single_layer=layer, fractions=efficiency.sources())
    return 0


if __name__ == "__main__":
    sys.exit(main())
