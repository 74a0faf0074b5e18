"""How long the runtime takes to dequantize one layer's routed experts (runtime.quant.dequantize_experts,
int8 and int4 into bf16) at each model's expert shape, against what the HRM prices for it
(hrm.rates.expert_dequant_s: the format's memory traffic per weight at the profile's HBM rate).

    python benchmarks/dequant_rate.py --hardware hrm/hardware_profiles/h200-measured.toml \
        --out benchmarks/results/dequant_rate-h200.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from result_file import write_result  # noqa: E402
from hrm.formats import expert_format  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.rates import Setting, expert_dequant_s  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from runtime.moe import expert_elems  # noqa: E402
from runtime.probe.calibration import MOE_MODELS  # noqa: E402
from runtime.quant import ExpertLayout, dequantize_experts  # noqa: E402


def _time_s(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(model: str, fmt_name: str, hw, device: str, repeats: int) -> dict:
    spec = load_model(model).with_expert_format(fmt_name)
    fmt = expert_format(fmt_name)
    layout = ExpertLayout.of(spec, fmt)
    E = spec.num_experts
    store = torch.randint(0, 256, (E, layout.nbytes), dtype=torch.uint8, device=device)   # [E, bytes]
    for m in layout.matrices:                     # finite scales: any bytes are valid weights
        layout.packed(store, m)[1].fill_(0.01)
    out = torch.empty(E, expert_elems(spec), dtype=torch.bfloat16, device=device)          # [E, 3 I H]
    seconds = _time_s(lambda: dequantize_experts(store, layout, out), device, repeats)
    s = Setting.of(spec, hw, Workload.uniform(256, 32), Policy(1, 1))
    priced = float(expert_dequant_s(s))
    weights = E * expert_elems(spec)
    row = {"model": model, "expert_dtype": fmt_name, "experts": E, "weights": weights, "seconds": seconds,
           "priced_s": priced, "bytes_per_weight_priced": fmt.dequant_traffic_bytes_per_weight,
           "effective_gb_per_s": weights * fmt.dequant_traffic_bytes_per_weight / seconds / 1e9}
    print(f"{model} {fmt_name}: {seconds * 1e3:.2f} ms per layer (priced {priced * 1e3:.2f}), "
          f"{row['effective_gb_per_s']:.0f} GB/s at the priced traffic", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MOE_MODELS))
    p.add_argument("--hardware", default="h200-measured")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dequant_rate: no CUDA device (use --device cpu for a smoke test)")
    hw = load_profile(args.hardware)
    rows = [measure(m, f, hw, args.device, args.repeats) for m in args.models for f in ("int8", "int4")]
    write_result(args.out, "dequant_rate.py", argv, hardware=hw.name, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
