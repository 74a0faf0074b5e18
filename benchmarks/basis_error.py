"""How far the cost model misses on the whole-model runs committed, by the basis of its rates: the
profile's measurements (curves and calibrations); its unit-level rates with the efficiency model
(hrm/efficiency.py: what a machine without a measured profile is priced with); or those rates at their
roofline alone (the cost model before the efficiency model, kept for the record). `plan` and `estimate`
print the second as the uncertainty of a prediction whose basis is datasheet plus the efficiency model.

    python benchmarks/basis_error.py benchmarks/results/whole_model/h200-2026-12-02-call{4,5,6} \
        --out hrm/hardware_profiles/basis_error.json

The runs given should be of the runtime as it is (2026-12-02 calls 4-6: the grouped MoE without atomics);
earlier runs measured code that has changed since.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reprice_whole_model import rows_of  # noqa: E402
from result_file import write_result  # noqa: E402
from hrm.hardware import load_profile  # noqa: E402

def summary(errors_pct) -> dict:
    a = np.abs(np.asarray(errors_pct, float))
    return {"median_abs_pct": float(np.median(a)), "p90_abs_pct": float(np.percentile(a, 90)),
            "max_abs_pct": float(a.max()), "runs": int(a.size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders holding keep/*.plan.json and *.measurement.json")
    p.add_argument("--hardware", default="h200-measured", help="the profile of the machine the runs were made on")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    hw = load_profile(args.hardware)
    folders = sorted(args.folders)
    by_basis = {}
    for basis, use_measured, efficiency in (("measured", True, True), ("efficiency_model", False, True),
                                            ("datasheet", False, False)):
        rows = [r for d in folders for r in rows_of(d, hw, use_measured, efficiency)]
        if not rows:
            raise SystemExit("basis_error: no keep/*.measurement.json under the folders given")
        by_basis[basis] = summary([r["now_err_pct"] for r in rows])
        s = by_basis[basis]
        print(f"{basis:16s}: {s['runs']} runs, |error| median {s['median_abs_pct']:.1f}%, "
              f"90th percentile {s['p90_abs_pct']:.1f}%, max {s['max_abs_pct']:.1f}%")
    write_result(args.out, "basis_error.py", argv, hardware=hw.name, machine=hw.description,
                 runs=[str(d.resolve().relative_to(ROOT)) for d in folders], **by_basis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
