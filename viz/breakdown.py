"""Where the time and the memory of one policy go: per-layer stage times, prefill vs decode, memory."""
from __future__ import annotations

from hrm.estimate import Estimate

from .grid import resolve_budgets
from hrm.units import format_seconds

from .style import HIGHLIGHT, RESOURCE_COLORS, RESOURCE_NAMES, new_figure, policy_text

H2D_PARTS = ("h2d_weights", "h2d_act", "h2d_kv")
MS = 1e3


def _decode_bars(e: Estimate) -> list[tuple[str, dict]]:
    """(resource, {part: seconds}) in display order; the CPU->GPU bar stacks its three parts. A binding
    term that is not one resource (blocking's "serial", S3's "weights_block") gets its own bar, at the
    layer time it sets."""
    d = e.decode_layer
    bars = [("gpu", {"gpu": d["gpu"]}), ("cpu", {"cpu": d["cpu"]}),
            ("h2d", {k: d[k] for k in H2D_PARTS}), ("d2h", {"d2h": d["d2h"]}),
            ("link", {"link": d["link"]}), ("pipeline", {"pipeline": d["pipeline"]})]
    if e.bound not in {r for r, _ in bars}:
        bars.append((e.bound, {e.bound: e.layer_time_s}))
    return bars


def _name(resource: str) -> str:
    from hrm.estimate import RESOURCE_LABELS
    return RESOURCE_NAMES.get(resource) or RESOURCE_LABELS.get(resource, resource)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or text


def _hbar(ax, y, parts: dict, bound: bool):
    left = 0.0
    for k, v in parts.items():
        ax.barh(y, v * MS, left=left * MS, color=RESOURCE_COLORS.get(k, "#bcbd22"), edgecolor="black", lw=0.5,
                height=0.65)
        left += v
    if bound:
        ax.barh(y, left * MS, left=0, fill=False, edgecolor=HIGHLIGHT, lw=3, height=0.8)
    return left


def draw_decode_stages(ax, e: Estimate):
    from matplotlib.patches import Patch
    bars = _decode_bars(e)
    for y, (res, parts) in enumerate(bars):
        total = _hbar(ax, y, parts, res == e.bound)
        ax.text(total * MS, y, f" {format_seconds(total)}", va="center", fontsize=8,
                weight="bold" if res == e.bound else "normal")
    ax.set_yticks(range(len(bars)), [_wrap(_name(r)) for r, _ in bars])
    ax.invert_yaxis()
    ax.axvline(e.layer_time_s * MS, color=HIGHLIGHT, ls="--", lw=1.2)
    ax.set_xlim(0, max(sum(p.values()) for _, p in bars) * MS * 1.3)
    ax.set_xlabel("time per decoder layer per decode step (ms)")
    handles = [Patch(fill=False, edgecolor=HIGHLIGHT, lw=3, label=f"binding: {e.bound_label}")]
    handles += [Patch(color=RESOURCE_COLORS[k], label=RESOURCE_NAMES[k]) for k in H2D_PARTS
                if e.decode_layer[k] > 0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title(f"Decode: busy time of each resource per layer\n(at the mean context "
                 f"{e.workload.prompt_len + e.workload.gen_len / 2:g}; the longest sets the layer time)", fontsize=10)


def draw_prefill_stages(ax, e: Estimate):
    from matplotlib.patches import Patch
    items = list(e.prefill_layer.items())
    bound = max(e.prefill_layer, key=e.prefill_layer.get)
    names = {"h2d": "CPU->GPU: weights + hidden", "d2h": "GPU->CPU: KV + hidden"}
    for y, (res, v) in enumerate(items):
        _hbar(ax, y, {res: v}, res == bound)
        ax.text(v * MS, y, f" {format_seconds(v)}", va="center", fontsize=8, weight="bold" if res == bound else "normal")
    ax.set_yticks(range(len(items)), [names.get(r) or _wrap(_name(r)) for r, _ in items])
    ax.invert_yaxis()
    ax.set_xlim(0, max(v for _, v in items) * MS * 1.3)
    ax.set_xlabel("time per decoder layer, whole prefill pass (ms)")
    ax.legend(handles=[Patch(fill=False, edgecolor=HIGHLIGHT, lw=3, label=f"binding: {_name(bound)}")],
              loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    ax.set_title(f"Prefill: per layer, all {e.policy.batch_size} prompts "
                 f"({e.workload.prompt_len:g} tokens each)", fontsize=10)


def draw_time_split(ax, e: Estimate):
    """One vertical bar: prefill and decode seconds of a pass, stacked."""
    bottom = 0.0
    for name, v, c in (("prefill", e.prefill_s, "#17becf"), ("decode", e.decode_s, "#1f77b4")):
        ax.bar(0, v, bottom=bottom, color=c, edgecolor="black", lw=0.5, width=0.5,
               label=f"{name}: {format_seconds(v)} ({v / e.total_s:.0%})")
        bottom += v
    ax.set_xticks([0], [f"one pass of N={e.policy.batch_size}"])
    ax.set_xlim(-0.6, 0.6)
    ax.set_ylim(0, e.total_s * 1.35)
    ax.set_ylabel("time (s)")
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title(f"{e.throughput_tok_s:.4g} tok/s end to end\n(decode alone {e.decode_tok_s:.4g} tok/s)",
                 fontsize=10)


def _stack(ax, x, parts: dict, colors: dict, scale: float):
    bottom = 0.0
    for k, v in parts.items():
        if v <= 0:
            continue
        ax.bar(x, v * scale, bottom=bottom * scale, color=colors[k], edgecolor="black", lw=0.5, width=0.6)
        bottom += v
    return bottom


def draw_memory(ax, e: Estimate, gpu_capacity_bytes: float | None = None, cpu_capacity_bytes: float | None = None,
                gpu_budget_bytes: float | None = None, cpu_budget_bytes: float | None = None):
    """Stacked GPU and CPU memory use by part. With both capacities known, bars are in % of each level's
    capacity (so a 16 GB GPU and a 192 GB host read on one axis) with the budget drawn; else in GB."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    keys = [k for k in dict.fromkeys(list(e.memory.gpu) + list(e.memory.host))
            if e.memory.gpu.get(k, 0) > 0 or e.memory.host.get(k, 0) > 0]
    cmap = colormaps["tab10"]
    colors = {k: cmap(i % 10) for i, k in enumerate(keys)}
    relative = bool(gpu_capacity_bytes and cpu_capacity_bytes)
    levels = (("GPU", e.memory.gpu, gpu_capacity_bytes, gpu_budget_bytes),
              ("CPU", e.memory.host, cpu_capacity_bytes, cpu_budget_bytes))
    for x, (name, parts, cap, budget) in enumerate(levels):
        frac = budget / cap if relative and budget else None
        scale = 100.0 / cap if relative else 1e-9
        used = _stack(ax, x, parts, colors, scale)
        text = f"{used / 1e9:.3g} GB" + (f"\nof {cap / 1e9:.3g} GB" if cap else "")
        top = max(used * scale, frac * 100 if frac else 0.0)     # above the budget line, too
        ax.text(x, top, text, ha="center", va="bottom", fontsize=8)
        if frac:
            ax.hlines(frac * 100, x - 0.4, x + 0.4, color="red", lw=1.5, ls="--")
    ax.set_xticks([0, 1], ["GPU", "CPU"])
    ax.set_xlim(-0.6, 2.9)
    if relative:
        ax.set_ylim(0, 125)
        ax.axhline(100, color="black", lw=1)
        ax.set_ylabel("peak memory (% of capacity)")
    else:
        ax.set_ylabel("peak memory (GB)")
    handles = [Patch(color=colors[k], label=k.replace("_", " ")) for k in keys]
    if relative and (gpu_budget_bytes or cpu_budget_bytes):
        handles.append(Line2D([], [], color="red", lw=1.5, ls="--", label="budget"))
    ax.legend(handles=handles, loc="upper right", fontsize=7)
    ax.set_title("Memory at the peak, by part", fontsize=10)


def _capacities(hw, budgets):
    if hw is None:
        return None, None, None, None
    b = resolve_budgets(hw, budgets)
    return hw.gpu.memory_bytes * hw.gpu.count, hw.cpu.memory_bytes, b.gpu_bytes, b.cpu_bytes


def stage_breakdown_figure(estimate: Estimate, hw=None, budgets=None):
    """Per-stage times of one estimate: decode per-layer resource times (binding one outlined), prefill
    per-layer times, the prefill/decode split of a pass, and memory by part (in % of capacity with the
    budgets drawn when `hw` is given; budgets default to the optimizer's)."""
    e = estimate
    fig = new_figure(13, 9)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    ax_dec, ax_pre = top.subplots(1, 2)
    ax_time, ax_mem = bottom.subplots(1, 2, width_ratios=[1, 2.4])
    draw_decode_stages(ax_dec, e)
    draw_prefill_stages(ax_pre, e)
    draw_time_split(ax_time, e)
    draw_memory(ax_mem, e, *_capacities(hw, budgets))
    fig.suptitle(f"Where the time goes: {e.model} on {e.hardware}; {policy_text(e.policy)}, {e.policy.schedule}\n"
                 f"decode bound by {e.bound_label}")
    return fig


def memory_figure(estimate: Estimate, hw=None, budgets=None):
    """Memory by part on its own."""
    fig = new_figure(7, 5)
    ax = fig.add_subplot()
    draw_memory(ax, estimate, *_capacities(hw, budgets))
    ax.set_title(f"Peak memory: {estimate.model} on {estimate.hardware}\n{policy_text(estimate.policy)}")
    return fig

