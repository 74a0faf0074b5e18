"""A/B of the runtime's host settings on one policy: attention-worker threads left to the launcher
(runtime.cpu_attention.HOST_CORES_RESERVED), the GIL switch interval while generating
(runtime.engine.SWITCH_INTERVAL_S) and decode PostAttn CUDA graphs. Same machine, same policy, alternating, one JSON line per run.

    PYTHONPATH=. python benchmarks/ab_host_settings.py --hardware hrm/hardware_profiles/h200-measured.toml
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime.cpu_attention as cpu_attention  # noqa: E402
import runtime.engine as engine  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from validate import run_one, scaled_budget  # noqa: E402
from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from hrm.spec import Workload  # noqa: E402
from hrm.units import parse_size  # noqa: E402

SETTINGS = {  # name -> (cores reserved, switch interval s, CUDA graphs)
    "reserve2_switch0.1ms": (2, 1e-4, False), "reserve0_switch5ms": (0, 5e-3, False),
    "reserve0_switch0.1ms": (0, 1e-4, False), "reserve2_switch5ms": (2, 5e-3, False),
    "reserve2_switch0.1ms_graphs": (2, 1e-4, True)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default='{"batch_size": 900, "micro_batch_size": 36, "weights_gpu_frac": 0.125}')
    ap.add_argument("--settings", default="reserve2_switch0.1ms,reserve0_switch5ms")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    full = load_model("mixtral-8x7b")
    spec = full.with_layers(8)
    policy = Policy(**json.loads(args.policy))
    budget = scaled_budget(spec, 32, parse_size("24GiB"))
    for r in range(args.repeats):
        for name in args.settings.split(","):
            cpu_attention.HOST_CORES_RESERVED, engine.SWITCH_INTERVAL_S, graphs = SETTINGS[name]
            m, _ = run_one(spec, policy, Workload.uniform(256, 32), budget, seed=r, cuda_graphs=graphs)
            print(json.dumps({"setting": name, "repeat": r, "policy": policy.short(), "tok_s": m.tokens_per_s,
                              "decode_s": m.decode_s, "prefill_s": m.prefill_s,
                              "cpu_attention_s": sum(s.total_s for s in m.stages if s.name == "cpu_attention"
                                                     and s.phase == "decode")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
