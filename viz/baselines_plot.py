"""The chosen policy against the baselines (FlexGen-style, DeepSpeed-style, ...), priced by one model."""
from __future__ import annotations

import math

from .style import HIGHLIGHT, new_figure

NO_FIT = "does not fit the budgets"


def throughput_of(x) -> float:
    """tok/s of a number, an Estimate, a Plan or BaselineResult (via .estimate; NaN when its estimate is
    None), or None / NaN (does not fit)."""
    if x is None:
        return math.nan
    if isinstance(x, (int, float)):
        return float(x)
    if hasattr(x, "estimate"):
        return math.nan if x.estimate is None else float(x.estimate.throughput_tok_s)
    if hasattr(x, "throughput_tok_s"):
        return float(x.throughput_tok_s)
    raise TypeError(f"cannot read a throughput from {type(x).__name__}")


def label_of(x, default: str) -> str:
    """A display name: x.label / x.name, or x.baseline.label (optimizer.baselines.BaselineResult)."""
    for obj in (x, getattr(x, "baseline", None)):
        for attr in ("label", "name"):
            v = getattr(obj, attr, None)
            if isinstance(v, str) and v:
                return v
    return default


def as_entries(baselines) -> dict:
    """{label: tok/s} from a mapping (label -> number/Estimate/Plan) or a sequence of named objects."""
    if baselines is None:
        return {}
    if hasattr(baselines, "items"):
        return {str(k): throughput_of(v) for k, v in baselines.items()}
    return {label_of(b, f"baseline {i + 1}"): throughput_of(b) for i, b in enumerate(baselines)}


def draw_baselines(ax, entries: dict, chosen_label: str | None = None, chosen_tok_s: float | None = None):
    """Horizontal bars, best on top; the chosen policy highlighted; each bar's ratio to the chosen one."""
    items = dict(entries)
    if chosen_label is not None and chosen_tok_s is not None:
        items = {chosen_label: float(chosen_tok_s), **{k: v for k, v in items.items() if k != chosen_label}}
    ranked = sorted(items.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else math.inf)
    top = max((v for _, v in ranked if math.isfinite(v)), default=1.0)
    for y, (name, v) in enumerate(ranked):
        is_chosen = name == chosen_label
        if not math.isfinite(v) or v <= 0:
            ax.text(0.01 * top, y, NO_FIT, va="center", fontsize=8, color="#555555", style="italic")
            continue
        ax.barh(y, v, color=HIGHLIGHT if is_chosen else "#9ecae1", edgecolor="black", lw=0.6, height=0.65)
        ratio = "" if is_chosen or not chosen_tok_s else f"  (chosen is {chosen_tok_s / v:.2g}x)"
        ax.text(v, y, f" {v:.4g} tok/s{ratio}", va="center", fontsize=8, weight="bold" if is_chosen else "normal")
    ax.set_yticks(range(len(ranked)), [k for k, _ in ranked])
    ax.set_ylim(len(ranked) - 0.4, -0.6)          # best on top; rows without a bar keep their room
    ax.set_xlim(0, top * 1.6)
    ax.set_xlabel("predicted throughput (generated tok/s)")
    from matplotlib.patches import Patch
    handles = [Patch(color="#9ecae1", ec="black", label="baseline policy, same model and budgets")]
    if chosen_label is not None:
        handles.insert(0, Patch(color=HIGHLIGHT, ec="black", label=chosen_label))
    ax.legend(handles=handles, loc="lower right", fontsize=8)


def baselines_figure(baselines, chosen=None, chosen_label: str = "MoE-Lightning plan", title: str | None = None):
    """Bar chart of predicted throughput: the chosen policy (a Plan, an Estimate or tok/s) against
    `baselines` (a mapping label -> Plan/Estimate/tok/s, or a sequence of objects with .name and
    .estimate / .throughput_tok_s; None or NaN marks a baseline that does not fit)."""
    entries = as_entries(baselines)
    fig = new_figure(9, 1.6 + 0.55 * (len(entries) + 1))
    ax = fig.add_subplot()
    draw_baselines(ax, entries, chosen_label if chosen is not None else None,
                   throughput_of(chosen) if chosen is not None else None)
    ax.set_title(title or "Chosen policy vs baselines (predicted by the same cost model)")
    return fig
