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
from runtime.quant import ExpertLayout, dequantize, dequantize_experts, unpack  # noqa: E402


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


def _variants(fmt_name: str) -> dict:
    """Other ways to write the same dequantization, to choose the runtime's by measurement: name ->
    fn(packed [E, out, row], scales [E, out, G] fp16, dst [E, out, in] bf16)."""
    fmt = expert_format(fmt_name)

    def whole(packed, scales, dst):                 # one call per matrix over every expert, no chunks
        dequantize(packed, scales, fmt, out=dst)

    def bf16_scales(packed, scales, dst):           # the scales rounded to bf16 first (not bit-equal)
        g = fmt.group_width(dst.shape[-1])
        v = unpack(packed, fmt).view(*dst.shape[:-1], dst.shape[-1] // g, g)
        torch.mul(v, scales.to(torch.bfloat16)[..., None], out=dst.view(v.shape))

    def compiled_fn():
        def f(packed, scales, dst):                  # written into dst inside the compiled graph
            g = fmt.group_width(packed.shape[-1] * 8 // fmt.bits)
            q = unpack(packed, fmt).float()
            q = q.view(*q.shape[:-1], q.shape[-1] // g, g) * scales.float()[..., None]
            dst.copy_(q.flatten(-2))
        return torch.compile(f, dynamic=False)

    out = {"whole": whole, "bf16_scales": bf16_scales}
    try:
        out["compiled"] = compiled_fn()
    except Exception as e:  # noqa: BLE001  (no inductor backend here: reported, not fatal)
        print(f"torch.compile unavailable: {e}", flush=True)
    return out


def measure_variants(model: str, fmt_name: str, device: str, repeats: int) -> list[dict]:
    """Each variant on one layer's experts, matrix by matrix, timed like `measure` and compared with the
    runtime's dequantize (max |difference| relative to the largest weight)."""
    spec = load_model(model).with_expert_format(fmt_name)
    fmt = expert_format(fmt_name)
    layout = ExpertLayout.of(spec, fmt)
    E = spec.num_experts
    store = torch.randint(0, 256, (E, layout.nbytes), dtype=torch.uint8, device=device)
    for m in layout.matrices:
        layout.packed(store, m)[1].uniform_(0.005, 0.02)
    ref = dequantize_experts(store, layout, torch.empty(E, expert_elems(spec), dtype=torch.bfloat16, device=device))
    rows = []
    for name, fn in _variants(fmt_name).items():
        out = torch.zeros_like(ref)

        def run():
            for m in layout.matrices:
                packed, scales = layout.packed(store, m)
                dst = out[:, m.elems_at:m.elems_at + m.out_features * m.in_features]
                fn(packed, scales, dst.view(E, m.out_features, m.in_features))
        try:
            t0 = time.perf_counter()
            run()
            first_s = time.perf_counter() - t0
            seconds = _time_s(run, device, repeats)
        except Exception as e:  # noqa: BLE001  (a variant that cannot run here is a row saying why)
            rows.append({"model": model, "expert_dtype": fmt_name, "variant": name, "error": str(e).splitlines()[0]})
            continue
        diff = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        weights = E * expert_elems(spec)
        rows.append({"model": model, "expert_dtype": fmt_name, "variant": name, "seconds": seconds,
                     "first_call_s": first_s, "max_rel_diff": diff,
                     "effective_gb_per_s": weights * fmt.dequant_traffic_bytes_per_weight / seconds / 1e9})
        print(f"{model} {fmt_name} {name}: {seconds * 1e3:.2f} ms per layer (first call {first_s:.1f} s), "
              f"max rel diff {diff:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MOE_MODELS))
    p.add_argument("--hardware", default="h200-measured")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", action="store_true", help="also time other ways to write it (one layer each)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dequant_rate: no CUDA device (use --device cpu for a smoke test)")
    hw = load_profile(args.hardware)
    rows = [measure(m, f, hw, args.device, args.repeats) for m in args.models for f in ("int8", "int4")]
    variants = ([r for m in args.models for f in ("int8", "int4")
                 for r in measure_variants(m, f, args.device, args.repeats)] if args.variants else [])
    write_result(args.out, "dequant_rate.py", argv, hardware=hw.name, rows=rows, variants=variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
