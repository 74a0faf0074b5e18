"""A/B of the grouped MoE: HEAD~ (index_add_ in fp32) vs the working tree, at prefill chunks."""
import json, sys, os
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks"); sys.path.insert(0, "scratch")
import moe_kernels, moe_old
from runtime import moe as moe_new
rows = []
out = sys.argv[1]
for name in ("qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b"):
    for impl, mod in (("old", moe_old), ("new", moe_new)):
        moe_kernels.moe = mod
        for sl in ((2048, 4096) if impl == "new" else (2048,)):
            for frac, sync in ((1.0, False), (0.25, True), (0.25, False)):
                if impl == "old" and sync:
                    continue
                try:
                    r = moe_kernels.profile_layer(name, 4096, frac, sync, sl)
                except Exception as e:
                    print('FAILED', impl, name, sl, frac, sync, repr(e)[:300], flush=True); continue
                r["impl"] = impl
                rows.append(r)
                print(f"{impl} {name} slice {sl} res {r['resident']}/{r['experts']} {'exact' if sync else 'free'}: "
                      f"{r['layer_ms']:.3f} ms {r['routed_tflops']:.0f} TF; GEMM {r['gemm_ms']:.3f}/{r['kernel_ms']:.3f} ms "
                      f"({r['gemm_tflops'] or 0:.0f} TF) top: " + ", ".join(f"{k['name'][:50]} {k['ms_per_layer']:.3f}" for k in r["kernels"][:6]), flush=True)
json.dump(rows, open(out, "w"), indent=1)
