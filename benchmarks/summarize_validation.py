"""Summarise committed validation runs: prediction error, the optimizer's choice against the best
measured policy, pipeline efficiency, and our chosen plan against the peers.

    python benchmarks/summarize_validation.py \
        benchmarks/results/h200/validation_24gb.csv+benchmarks/results/h200/validation_24gb_from7.csv \
        benchmarks/results/h200/validation_48gb.csv --peer benchmarks/results/h200/peer_hf_24gb_b16_gen32.json \
        -o benchmarks/results/h200/validation_summary.json

Prints a markdown table (for benchmarks/README.md) and writes the numbers as JSON. With --reprice PROFILE
the predictions of the committed measurements are recomputed under another profile (say, one measured
after the runs): the measurements stay as they were; the summary names the profile.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))          # validate.py, for --reprice
from hrm.atomic import atomic_write_text  # noqa: E402

FLEXGEN_TAGS = ("baseline:flexgen", "baseline:flexgen-c")
ROW_RE = re.compile(r"^\[\d+/\d+\] (?P<tag>.+?)\s+(?P<policy>N=\d+ .*?)\s+pred\s+(?P<pred>[\d.]+) meas\s+"
                    r"(?P<meas>[\d.]+) tok/s \((?P<err>[-+\d.]+)%\) prefill (?P<prefill>[\d.]+)s decode (?P<decode>[\d.]+)s "
                    r"gpu peak (?P<peak>[\d.]+) GB")
HEAD_RE = re.compile(r"budget (?P<budget>[\d.]+) GB \(full-model (?P<full>[\d.]+) GB\)")


def rows_from_log(log_text: str, sweep: int) -> pd.DataFrame:
    """The per-policy lines validate.py prints, for the sweep-th sweep in a log (0-based): a fallback
    when a run's CSV did not come back. Only end-to-end numbers are in the log."""
    sweeps, rows = [], None
    for line in log_text.splitlines():
        if HEAD_RE.search(line):
            rows = []
            sweeps.append((HEAD_RE.search(line), rows))
        elif (m := ROW_RE.match(line)) and rows is not None:
            rows.append({"tag": m["tag"].strip(), "policy": m["policy"].strip(), "pred_tok_s": float(m["pred"]),
                         "meas_tok_s": float(m["meas"]), "err_tok_s": float(m["err"]) / 100,
                         "meas_prefill_s": float(m["prefill"]), "meas_decode_s": float(m["decode"]),
                         "meas_gpu_peak_bytes": float(m["peak"]) * 1e9})
    head, rows = sweeps[sweep]
    df = pd.DataFrame(rows)
    df.attrs["gpu_budget_full_model_bytes"] = float(head["full"]) * 1e9
    return df


def reprice(df: pd.DataFrame, meta: dict, profile) -> pd.DataFrame:
    """The measured rows of one sweep with every prediction column recomputed by the HRM under `profile`
    (a HardwareProfile): same policies, model, layers and workload as the run (from its command line)."""
    from hrm.policy import Policy
    from validate import error_columns, parser, predicted_columns, sweep_setting

    command = meta["command"].split()
    _, spec, workload = sweep_setting(parser().parse_args(command[command.index("benchmarks/validate.py") + 1:]))
    rows = []
    for _, r in df[df["meas_tok_s"].notna()].iterrows():
        row = r.to_dict()
        fields = {k[len("policy_"):]: (v.item() if hasattr(v, "item") else v)
                  for k, v in row.items() if k.startswith("policy_") and k != "policy_"}
        row.update(predicted_columns(spec, profile, workload, Policy(**fields)))
        row.update(error_columns(row))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(csv_arg: str, peers: list[dict], profile=None) -> tuple[dict, pd.DataFrame]:
    """One sweep, from one CSV or from its parts joined with '+' (a sweep finished with validate.py
    --skip); the sidecar JSON of the first part describes the run. With `profile`, the predictions are
    recomputed under it (reprice). Returns the summary and the rows it was made from."""
    parts = [Path(p) for p in str(csv_arg).split("+")]
    df = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    if profile is not None:
        df = reprice(df, json.loads(parts[0].with_suffix(".json").read_text()), profile)
    summary = summarize_frame(df, parts[0], peers)
    summary["file"] = " + ".join(p.name for p in parts)
    if profile is not None:
        summary["repriced_with"] = profile.path or profile.name
    df.insert(0, "sweep", summary["file"])
    return summary, df


def summarize_frame(df: pd.DataFrame, csv_path: Path, peers: list[dict]) -> dict:
    ok = df[df["meas_tok_s"].notna()] if "meas_tok_s" in df else df.iloc[0:0]
    meta_path = csv_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else dict(df.attrs)
    err = ok["err_tok_s"].abs()
    chosen = ok[ok["tag"] == "chosen"]
    out = {
        "file": csv_path.name, "model": meta.get("model"), "device": meta.get("device"), "date": meta.get("date"),
        "gpu_budget_full_model_gb": (meta.get("gpu_budget_full_model_bytes") or 0) / 1e9,
        "gpu_budget_gb": (meta.get("gpu_budget_bytes") or 0) / 1e9, "workload": meta.get("workload"),
        "policies_run": int(len(ok)), "policies_failed": int(len(df) - len(ok)),
        "median_abs_err_tok_s": float(err.median()) if len(ok) else None,
        "max_abs_err_tok_s": float(err.max()) if len(ok) else None,
        "median_abs_err_decode": float(ok["err_decode_tok_s"].abs().median()) if "err_decode_tok_s" in ok else None,
        "median_abs_err_prefill": float(ok["err_prefill_s"].abs().median()) if "err_prefill_s" in ok else None,
        "best_measured_policy": None, "chosen_vs_best_measured": None, "pipeline_efficiency_chosen": None,
        "ratios": {},
    }
    if len(ok):
        best = ok.loc[ok["meas_tok_s"].idxmax()]
        out["best_measured_policy"] = f"{best['tag']}: {best['policy']} ({best['meas_tok_s']:.1f} tok/s)"
    if len(chosen):
        c = chosen.iloc[0]
        out["chosen_policy"] = c["policy"]
        out["chosen_measured_tok_s"] = float(c["meas_tok_s"])
        out["chosen_predicted_tok_s"] = float(c["pred_tok_s"])
        out["chosen_vs_best_measured"] = float(c["meas_tok_s"] / ok["meas_tok_s"].max())
        if "pipeline_efficiency" in c and pd.notna(c["pipeline_efficiency"]):
            out["pipeline_efficiency_chosen"] = float(c["pipeline_efficiency"])
        for tag in ok["tag"].unique():
            if tag.startswith("baseline:"):
                out["ratios"][tag] = float(c["meas_tok_s"] / ok[ok["tag"] == tag]["meas_tok_s"].max())
        flex = ok[ok["tag"].isin(FLEXGEN_TAGS)]
        if len(flex):
            out["ratios"]["best_flexgen_style"] = float(c["meas_tok_s"] / flex["meas_tok_s"].max())
        budget = float(meta.get("gpu_budget_full_model_bytes") or 0) or 1.0
        for p in peers:
            ok_rows = [r for r in p["rows"] if r.get("status") == "ok"
                       and abs(float(r.get("gpu_budget_full_bytes", 0)) - budget) < 0.02 * budget]
            if ok_rows:
                name = peer_name(p)
                best_peer = max(ok_rows, key=lambda r: float(r["tokens_per_s"]))
                out["ratios"][f"{name}_b{best_peer['batch_size']}"] = float(
                    c["meas_tok_s"] / float(best_peer["tokens_per_s"]))
                out[f"{name}_tok_s"] = float(best_peer["tokens_per_s"])
    return out


def peer_name(peer: dict) -> str:
    """A peer JSON's name in the summary: its script's (peer_hf_accelerate.py -> hf_accelerate,
    peer_deepspeed.py -> deepspeed)."""
    return str(peer.get("benchmark", "peer_hf_accelerate")).removeprefix("peer_")


def markdown(summaries: list[dict]) -> str:
    lines = ["| run | policies | median abs err (e2e) | max abs err | chosen / best measured | pipeline eff. "
             "| ours / HF accelerate | ours / DeepSpeed | ours / best FlexGen-style |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        hf = next((v for k, v in s["ratios"].items() if k.startswith("hf_accelerate")), None)
        ds = next((v for k, v in s["ratios"].items() if k.startswith("deepspeed_b")), None)
        fx = s["ratios"].get("best_flexgen_style")

        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}%"

        def ratio(x):
            return "-" if x is None else f"{x:.2f}x"
        lines.append(f"| {s['file']} ({s['gpu_budget_full_model_gb'] * 1e9 / 2**30:.0f} GiB budget) | {s['policies_run']} "
                     f"| {pct(s['median_abs_err_tok_s'])} | {pct(s['max_abs_err_tok_s'])} "
                     f"| {pct(s['chosen_vs_best_measured'])} | {pct(s['pipeline_efficiency_chosen'])} "
                     f"| {ratio(hf)} | {ratio(ds)} | {ratio(fx)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="*", help="a validate.py CSV, or the parts of one sweep joined with '+'")
    ap.add_argument("--from-log", nargs=2, action="append", default=[], metavar=("LOG", "SWEEP"),
                    help="also summarise the SWEEP-th sweep (0-based) printed in a validate.py log")
    ap.add_argument("--peer", action="append", type=Path, default=[], help="peer_hf_accelerate.py or peer_deepspeed.py JSON output")
    ap.add_argument("--reprice", metavar="PROFILE",
                    help="recompute every prediction under this hardware profile (name or .toml) before summarising")
    ap.add_argument("--rows", type=Path, help="also write the rows summarised (repriced ones with --reprice) as CSV")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    peers = [json.loads(p.read_text()) for p in args.peer]
    profile = None
    if args.reprice:
        from hrm.hardware import load_profile
        profile = load_profile(args.reprice)
    done = [summarize(p, peers, profile) for p in args.csv]
    summaries = [s for s, _ in done]
    if args.rows and done:
        frame = pd.concat([d for _, d in done], ignore_index=True)
        atomic_write_text(args.rows, frame.to_csv(index=False))
    summaries += [summarize_frame(rows_from_log(Path(log).read_text(), int(k)), Path(f"{Path(log).name}#sweep{k}"), peers)
                  for log, k in args.from_log]
    print(markdown(summaries))
    if args.output:
        atomic_write_text(args.output, json.dumps({"command": " ".join(["python"] + sys.argv), "runs": summaries},
                                                  indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
