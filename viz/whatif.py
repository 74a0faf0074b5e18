"""What-if hardware: re-plan on variants of a machine and show how the best policy shifts."""
from __future__ import annotations

import math

from hrm.hardware import HardwareProfile
from hrm.units import GB, GiB
from hrm.spec import ModelSpec, Workload

from .style import RESOURCE_COLORS, RESOURCE_NAMES, new_figure

PCIE_X16_BYTES_PER_S = {"PCIe 3.0": 12.5 * GB, "PCIe 4.0": 25.0 * GB, "PCIe 5.0": 50.0 * GB, "PCIe 6.0": 100.0 * GB}
"""Typical pinned copy rates of an x16 slot, per direction (FACTS.md: T4 Gen3 12-13 GB/s, A100 Gen4 ~25,
H100/H200 Gen5 50-56)."""

ATTENTION_MARKERS = {False: "o", True: "s"}


def gpu_memory_variants(hw: HardwareProfile, gib=(8, 16, 24, 48, 80)) -> dict:
    return {f"{g:g} GiB": hw.with_gpu_memory(g * GiB) for g in gib}


def cpu_memory_variants(hw: HardwareProfile, gb=(64, 128, 192, 384)) -> dict:
    return {f"{g:g} GB": hw.with_cpu_memory(g * GB) for g in gb}


def pcie_variants(hw: HardwareProfile, generations=("PCIe 3.0", "PCIe 4.0", "PCIe 5.0")) -> dict:
    """The link set to each generation's typical x16 rate (both directions and duplex scaled alike)."""
    return {gen: hw.scaled(link=PCIE_X16_BYTES_PER_S[gen] / hw.link.h2d_bytes_per_s) for gen in generations}


def cpu_bandwidth_variants(hw: HardwareProfile, factors=(0.5, 1.0, 2.0)) -> dict:
    return {f"{f * hw.cpu.mem_bytes_per_s / GB:.0f} GB/s": hw.scaled(cpu_mem_bw=f) for f in factors}


def sweep(spec: ModelSpec, workload: Workload, variants: dict, **search_kw):
    """One optimizer.search per hardware variant -> a DataFrame row each (variant, the chosen policy, its
    predicted throughput and binding resource; tok/s NaN and the reason when nothing fits)."""
    import pandas as pd
    from optimizer.search import search
    from optimizer.space import SearchError
    rows = []
    for label, hw in variants.items():
        row = {"variant": label, "gpu_memory_gib": hw.gpu.memory_bytes / GiB, "cpu_memory_gb": hw.cpu.memory_bytes / GB,
               "link_gb_per_s": hw.link.h2d_bytes_per_s / GB, "cpu_bw_gb_per_s": hw.cpu.mem_bytes_per_s / GB}
        try:
            plan = search(spec, hw, workload, **search_kw)
        except SearchError as e:
            rows.append({**row, "throughput_tok_s": math.nan, "reason": str(e)})
            continue
        p, e = plan.policy, plan.estimate
        rows.append({**row, "N": p.batch_size, "mu": p.micro_batch_size, "r_w": p.weights_gpu_frac,
                     "r_c": p.kv_gpu_frac, "attention_on_gpu": p.attention_on_gpu, "ffn_on_gpu": p.ffn_on_gpu,
                     "schedule": p.schedule, "throughput_tok_s": e.throughput_tok_s, "decode_tok_s": e.decode_tok_s,
                     "bound": e.bound, "reason": ""})
    return pd.DataFrame(rows)


def _draw_sweep(ax_t, ax_p, df, title: str):
    x = list(range(len(df)))
    fits = df["throughput_tok_s"].notna()
    colors = [RESOURCE_COLORS.get(b, "#7f7f7f") if f else "#cccccc"
              for b, f in zip(df.get("bound", [None] * len(df)), fits)]
    ax_t.bar(x, df["throughput_tok_s"].fillna(0.0), color=colors, edgecolor="black", lw=0.5)
    for xi, v, f in zip(x, df["throughput_tok_s"], fits):
        ax_t.text(xi, v if f else 0.0, f"{v:.3g}" if f else "does\nnot fit", ha="center", va="bottom", fontsize=8)
    ax_t.set_xticks(x, df["variant"], rotation=0, fontsize=8)
    ax_t.set_ylabel("predicted throughput (tok/s)")
    top = df["throughput_tok_s"].max()
    ax_t.set_ylim(0, (top if math.isfinite(top) and top > 0 else 1.0) * 1.25)
    ax_t.set_title(title, fontsize=10)
    from matplotlib.patches import Patch
    bounds = [b for b in dict.fromkeys(df.loc[fits, "bound"])] if "bound" in df and fits.any() else []
    ax_t.legend(handles=[Patch(color=RESOURCE_COLORS.get(b, "#7f7f7f"), label=f"bound: {RESOURCE_NAMES.get(b, b)}")
                         for b in bounds]
                or [Patch(color="#cccccc", label="does not fit")], fontsize=7, loc="upper left")

    ax_p.set_yscale("log")
    ticks = list(df["variant"])
    if fits.any():
        d = df[fits]
        xs = [xi for xi, f in zip(x, fits) if f]
        ax_p.plot(xs, d["N"], "-", color="#1f77b4", lw=1)
        ax_p.plot(xs, d["mu"], "-", color="#ff7f0e", lw=1)
        for xi, n, m, a in zip(xs, d["N"], d["mu"], d["attention_on_gpu"]):
            ax_p.plot(xi, n, ATTENTION_MARKERS[bool(a)], color="#1f77b4", mec="black", ms=7)
            ax_p.plot(xi, m, ATTENTION_MARKERS[bool(a)], color="#ff7f0e", mec="black", ms=7)
        lo, hi = float(d["mu"].min()), float(d["N"].max())
        ax_p.set_ylim(lo / 2.5, hi * 2.5)
        for xi, rw in zip(xs, d["r_w"]):
            ticks[xi] = f"{ticks[xi]}\nr_w={rw:.2f}"
    ax_p.set_xticks(x, ticks, fontsize=8)
    ax_p.set_xlim(-0.5, len(df) - 0.5)
    ax_p.set_ylabel("chosen N and mu (sequences)")
    ax_p.grid(True, axis="y", alpha=0.3)


def _policy_legend_handles():
    from matplotlib.lines import Line2D
    return [Line2D([], [], color="#1f77b4", marker="o", mec="black", label="chosen N (batch)"),
            Line2D([], [], color="#ff7f0e", marker="o", mec="black", label="chosen mu (micro-batch)"),
            Line2D([], [], ls="", marker="o", color="grey", mec="black", label="attention on CPU"),
            Line2D([], [], ls="", marker="s", color="grey", mec="black", label="attention on GPU")]


def policy_shift_figure(sweeps: dict, title: str | None = None):
    """For each sweep (title -> DataFrame from `sweep`): predicted throughput per variant (coloured by
    the binding resource) above the chosen N, mu, r_w and attention placement."""
    n = len(sweeps)
    fig = new_figure(4.6 * n, 8)
    axes = fig.subplots(2, n, squeeze=False)
    for k, (name, df) in enumerate(sweeps.items()):
        _draw_sweep(axes[0, k], axes[1, k], df, name)
    fig.legend(handles=_policy_legend_handles(), loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(title or "How the best policy shifts with the hardware (each bar: one optimizer run)")
    return fig
