"""Predicted vs measured throughput: a scatter around y = x and the error per policy."""
from __future__ import annotations

import numpy as np

from .style import new_figure

REQUIRED = ("predicted_tok_s", "measured_tok_s", "policy")


def _check(df) -> None:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"predicted vs measured needs columns {', '.join(REQUIRED)}; missing: {', '.join(missing)}")
    if len(df) == 0:
        raise ValueError("predicted vs measured: the table has no rows")


def error_table(df):
    """Per policy: runs, mean predicted and measured tok/s, signed and absolute relative error (%).

    Relative error = (predicted - measured) / measured: positive means the model is optimistic.
    """
    import pandas as pd
    _check(df)
    d = df.assign(error_pct=100.0 * (df["predicted_tok_s"] - df["measured_tok_s"]) / df["measured_tok_s"])
    d = d.assign(abs_error_pct=d["error_pct"].abs())
    out = d.groupby("policy", sort=False).agg(
        runs=("error_pct", "size"), predicted_tok_s=("predicted_tok_s", "mean"),
        measured_tok_s=("measured_tok_s", "mean"), error_pct=("error_pct", "mean"),
        min_error_pct=("error_pct", "min"), max_error_pct=("error_pct", "max"),
        abs_error_pct=("abs_error_pct", "mean"))
    return pd.DataFrame(out)


LEGEND_MAX_POLICIES = 10     # above this, the scatter's colours are named by the bar chart beside it only


def predicted_vs_measured_figure(df, title: str | None = None, band_pct: float = 20.0,
                                 measured_label: str = "measured throughput (generated tok/s)",
                                 predicted_label: str = "predicted throughput (generated tok/s)"):
    """Left: predicted vs measured tok/s per run, coloured by policy, with y = x and a +-band_pct% band.
    Right: the mean relative error per policy (whiskers: min and max over its runs).
    measured_label / predicted_label name the axes (say so when a column is not a measurement)."""
    from matplotlib import colormaps
    _check(df)
    table = error_table(df)
    policies = list(table.index)
    cmap = colormaps["tab10"] if len(policies) <= 10 else colormaps["tab20"]
    colors = {p: cmap(i % cmap.N) for i, p in enumerate(policies)}

    fig = new_figure(13, max(5.8, 1.5 + 0.24 * len(policies)))
    ax, ax_err = fig.subplots(1, 2, width_ratios=[1, 1.1])
    pred, meas = df["predicted_tok_s"].to_numpy(float), df["measured_tok_s"].to_numpy(float)
    lo, hi = float(np.nanmin([pred.min(), meas.min()])), float(np.nanmax([pred.max(), meas.max()]))
    log = lo > 0 and hi / lo > 10
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        lim = (lo / 1.5, hi * 1.5)
    else:
        pad = 0.1 * (hi - lo if hi > lo else max(hi, 1.0))
        lim = (max(0.0, lo - pad), hi + pad)
    xs = np.geomspace(*lim, 100) if log else np.linspace(*lim, 100)
    ax.fill_between(xs, xs * (1 - band_pct / 100), xs * (1 + band_pct / 100), color="grey", alpha=0.15,
                    label=f"within +-{band_pct:g}%")
    ax.plot(xs, xs, color="black", lw=1, label="y = x (perfect prediction)")
    for p in policies:
        rows = df[df["policy"] == p]
        ax.plot(rows["measured_tok_s"], rows["predicted_tok_s"], "o", ms=8, mec="black", color=colors[p],
                label=str(p) if len(policies) <= LEGEND_MAX_POLICIES else None)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(measured_label)
    ax.set_ylabel(predicted_label)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title("Predicted vs measured, one point per run" if len(policies) <= LEGEND_MAX_POLICIES
                 else "Predicted vs measured (colours: the bars' policies)")

    y = np.arange(len(policies))
    err = table["error_pct"].to_numpy(float)
    whisk = np.vstack([err - table["min_error_pct"].to_numpy(float), table["max_error_pct"].to_numpy(float) - err])
    several = bool((table["runs"] > 1).any())
    ax_err.barh(y, err, color=[colors[p] for p in policies], edgecolor="black", lw=0.5, zorder=2,
                xerr=whisk if several else None, capsize=3)
    for yi, e, lo_e, hi_e in zip(y, err, table["min_error_pct"], table["max_error_pct"]):
        end = max(e, hi_e) if e >= 0 else min(e, lo_e)      # past the whisker
        ax_err.text(end, yi, f"  {e:+.1f}%  ", va="center", ha="left" if e >= 0 else "right", fontsize=8, zorder=3)
    ax_err.axvline(0, color="black", lw=1, zorder=2)
    ax_err.axvspan(-band_pct, band_pct, color="grey", alpha=0.15, zorder=0, label=f"within +-{band_pct:g}%")
    if several:
        ax_err.errorbar([], [], xerr=[], color="black", capsize=3, label="min to max over the runs")
    ax_err.set_yticks(y, [str(p) for p in policies])
    ax_err.invert_yaxis()
    span = max(float(np.nanmax(np.abs(np.concatenate([err, table["min_error_pct"], table["max_error_pct"]])))),
               band_pct) * 1.35
    ax_err.set_xlim(-span, span)
    ax_err.set_xlabel("(predicted - measured) / measured (%); > 0: the model is optimistic")
    ax_err.legend(fontsize=8, loc="lower right")
    mape = float(table["abs_error_pct"].mean())
    ax_err.set_title(f"Error per policy (mean |error| {mape:.1f}%)")
    fig.suptitle(title or f"Predicted vs measured throughput ({len(df)} runs, {len(policies)} policies)")
    fig.moe_lightning_data = table
    return fig


def error_by_micro_batches_figure(df, title: str | None = None, band_pct: float = 10.0):
    """Relative error of each run against its number of micro-batches (ceil(N / mu)), one marker per
    schedule, one colour per source file, with a +-band_pct% band. A fixed cost per micro-batch that the
    model under-prices shows as an error growing to the right. Needs policy_batch_size,
    policy_micro_batch_size and policy_schedule (validate.py's CSV columns)."""
    need = ("policy_batch_size", "policy_micro_batch_size", "policy_schedule")
    _check(df)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"error by micro-batches needs columns {', '.join(missing)}")
    from matplotlib import colormaps
    n = np.ceil(df["policy_batch_size"].to_numpy(float) / df["policy_micro_batch_size"].to_numpy(float))
    err = 100.0 * (df["predicted_tok_s"].to_numpy(float) - df["measured_tok_s"].to_numpy(float)) \
        / df["measured_tok_s"].to_numpy(float)
    sources = list(dict.fromkeys(df["source"])) if "source" in df.columns else [None]
    colors = {src: colormaps["tab10"](i % 10) for i, src in enumerate(sources)}
    markers = {"cgopipe": "o", "s3": "s", "s4": "^", "blocking": "D"}
    fig = new_figure(8.5, 5.2)
    ax = fig.subplots()
    ax.axhspan(-band_pct, band_pct, color="0.9", zorder=0, label=f"+-{band_pct:g}%")
    ax.axhline(0.0, color="0.4", lw=0.8)
    for sched in dict.fromkeys(df["policy_schedule"]):
        for src in sources:
            sel = (df["policy_schedule"] == sched).to_numpy()
            if src is not None:
                sel = sel & (df["source"] == src).to_numpy()
            if sel.any():
                ax.scatter(n[sel], err[sel], marker=markers.get(sched, "x"), color=colors[src], s=46,
                           label=f"{sched}" + (f" ({src})" if src is not None and len(sources) > 1 else ""))
    ax.set_xscale("log")
    ax.set_xlabel("micro-batches per layer (N / mu, log)")
    ax.set_ylabel("prediction error of end-to-end tok/s (%)\n(predicted - measured) / measured")
    ax.set_title(title or "Prediction error against the number of micro-batches")
    ax.legend(fontsize=8, loc="best")
    fig.moe_lightning_data = {"micro_batches": n.tolist(), "error_pct": err.tolist()}
    return fig


COLUMN_ALIASES = {
    "predicted_tok_s": ("predicted_tok_s", "pred_tok_s", "predicted_tokens_per_s", "predicted_throughput_tok_s", "predicted"),
    "measured_tok_s": ("measured_tok_s", "meas_tok_s", "measured_tokens_per_s", "measured_throughput_tok_s", "tokens_per_s",
                       "measured"),
    "policy": ("policy", "policy_label", "label", "baseline", "plan_id"),
}


def normalise_columns(df):
    """Rename known aliases to predicted_tok_s / measured_tok_s / policy; without a policy column, label
    rows by their batch and micro-batch sizes when those columns exist."""
    rename = {}
    for canon, names in COLUMN_ALIASES.items():
        if canon in df.columns:
            continue
        for n in names:
            if n in df.columns:
                rename[n] = canon
                break
    df = df.rename(columns=rename)
    if "policy" not in df.columns and {"batch_size", "micro_batch_size"} <= set(df.columns):
        df = df.assign(policy=[f"N={n} mu={m}" for n, m in zip(df["batch_size"], df["micro_batch_size"])])
    return df


def load_validation(paths):
    """Concatenate validation CSVs (a path, a glob pattern or a list of paths) into one DataFrame with
    the columns predicted_vs_measured_figure needs, plus `source` (the file each row came from)."""
    import glob
    import os

    import pandas as pd
    if isinstance(paths, (str, os.PathLike)):
        paths = sorted(glob.glob(str(paths), recursive=True)) if any(c in str(paths) for c in "*?[") else [paths]
    frames = [normalise_columns(pd.read_csv(p)).assign(source=os.path.basename(str(p))) for p in paths]
    # policies that failed to run have no measurement (benchmarks/validate.py records them with an error)
    frames = [f.dropna(subset=["measured_tok_s"]) if "measured_tok_s" in f else f for f in frames]
    if not frames:
        raise FileNotFoundError("no validation results found")
    df = pd.concat(frames, ignore_index=True)
    _check(df)
    return df
