"""A peer's results (benchmarks/peer_hf_accelerate.py, benchmarks/peer_deepspeed.py) as rows of the whole-model
results schema (benchmarks/whole_model.py COLUMNS), so that they sit beside our runs in one table: tag
`peer:hf-accelerate` or `peer:deepspeed`, the policy as the peer's batch and experts implementation, bf16 experts
and KV cache, and no prediction (a peer has none).

    python benchmarks/peer_rows.py PEER.json [PEER.json ...] -o rows.csv
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402
from whole_model import COLUMNS  # noqa: E402

TAGS = {"peer_hf_accelerate": "peer:hf-accelerate", "peer_deepspeed": "peer:deepspeed"}


def whole_model_rows(peer: dict, source: str) -> list[dict]:
    """One whole-model row per batch size the peer tried (`peer`: its JSON; `source`: that file's path)."""
    if peer.get("benchmark") not in TAGS:
        raise ValueError(f"{source}: not a peer's results (benchmark {peer.get('benchmark')!r})")
    tag = peer.get("tag") or TAGS[peer["benchmark"]]
    out = []
    for r in peer["rows"]:
        ok = r.get("status") == "ok"
        row = {"date": peer["date"], "model": r["model"], "num_layers": r["num_layers"],
               "model_layers": r["full_layers"], "gpu_budget_bytes": r["gpu_budget_full_bytes"],
               "host_budget_bytes": peer["environment"]["cpu_memory_bytes"], "tag": tag,
               "policy": f"N={r['batch_size']} experts={r.get('experts_implementation') or 'default'}",
               "completed": ok, "error": "" if ok else f"{r.get('status')}: {r.get('error', '')}".rstrip(": "),
               "plan_file": source, "expert_dtype": "bf16", "kv_dtype": "bf16"}
        if ok:
            row.update(meas_tok_s=r["tokens_per_s"], meas_prefill_s=r["prefill_s"],
                       meas_decode_s=r["wall_s"] - r["prefill_s"],
                       meas_gpu_allocated_peak_bytes=r.get("peak_gpu_bytes", ""),
                       meas_host_peak_bytes=r.get("peak_host_rss_bytes", ""), wall_s=r["wall_s"])
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("peers", nargs="+", help="a peer's results JSON")
    p.add_argument("-o", "--out", required=True, help="CSV to write (the whole-model columns)")
    args = p.parse_args(argv)
    rows = []
    for f in args.peers:
        try:
            rows += whole_model_rows(json.loads(Path(f).read_text()), f)
        except (OSError, ValueError, KeyError) as e:
            print(f"peer_rows: {f}: {e}" if not isinstance(e, ValueError) else f"peer_rows: {e}", file=sys.stderr)
            return 2
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(args.out), buf.getvalue())
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
