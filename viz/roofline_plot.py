"""The hierarchical roofline of a machine with a model's decode operators placed on it (paper Fig. 3/4)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hrm import roofline as rl
from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec

from .style import RESOURCE_COLORS, new_figure

TERA = 1e12


def _series_colors(n: int):
    from matplotlib import colormaps
    cmap = colormaps["plasma"]
    return [cmap(0.1 + 0.75 * i / max(n - 1, 1)) for i in range(n)]


def draw_roofline(ax, hw: HardwareProfile, spec: ModelSpec, batches: Sequence[int] = (16, 64, 256, 1024, 4096),
                  micro_batches: Sequence[int] = (8, 64, 512), ctx: int = 1024, weights_gpu_frac: float = 0.0,
                  compact: bool = False) -> dict:
    """Draw the roofline on `ax`; returns the numbers drawn (P1, P2, balance points, operator points).

    The MoE FFN is placed with its CPU-resident experts (1 - weights_gpu_frac of them) streamed once per
    pass; with every expert resident (r_w = 1) nothing streams, so it is drawn as if all were streamed."""
    if not 0.0 <= weights_gpu_frac < 1.0:
        weights_gpu_frac = 0.0
    h = rl.Hierarchy.of(hw, spec.dtypes.name)
    p1, p2 = float(rl.turning_point_p1(h)), float(rl.turning_point_p2(h))
    attn = rl.decode_attention_point(h, spec, int(batches[0]), int(ctx))
    ffn = {mu: [rl.moe_ffn_point(h, spec, int(n), int(mu), weights_gpu_frac) for n in batches if n >= mu]
           for mu in micro_batches}
    ffn = {mu: pts for mu, pts in ffn.items() if pts}
    intensities = [attn.intensity_cpu] + [p.intensity_cpu for pts in ffn.values() for p in pts]
    x_lo = 10 ** np.floor(np.log10(min(min(intensities), h.cpu.ridge, 1.0) / 2))
    x_hi = 10 ** np.ceil(np.log10(max(max(intensities), p2, h.gpu.ridge) * 2))
    xs = np.geomspace(x_lo, x_hi, 512)

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvspan(x_lo, p1, color=RESOURCE_COLORS["cpu"], alpha=0.06, lw=0)
    ax.plot(xs, rl.attainable(h.gpu, xs) / TERA, color=RESOURCE_COLORS["gpu"], lw=2.5,
            label=f"GPU roof: {h.gpu.peak_flops / TERA:.3g} TFLOP/s, HBM {h.gpu.mem_bytes_per_s / 1e9:.4g} GB/s")
    ax.plot(xs, rl.attainable(h.cpu, xs) / TERA, color=RESOURCE_COLORS["cpu"], lw=2.5,
            label=f"CPU roof: {h.cpu.peak_flops / TERA:.3g} TFLOP/s, DRAM {h.cpu.mem_bytes_per_s / 1e9:.4g} GB/s")
    ax.plot(xs, np.minimum(h.gpu.peak_flops, h.link_bytes_per_s * xs) / TERA, color=RESOURCE_COLORS["h2d"],
            lw=2, ls="--", label=f"GPU fed over the link: {h.link_bytes_per_s / 1e9:.3g} GB/s x I(CPU bytes)")
    for x, name, why, top in ((p1, "P1", "link beats CPU compute", True),
                              (p2, "P2", "GPU no longer link-bound", False)):
        ax.axvline(x, color="black", lw=1, ls=":")
        right = np.log(x / x_lo) > 0.8 * np.log(x_hi / x_lo)     # near the right edge: write leftwards
        ax.annotate(f"{name} = {x:.3g}" if compact else f"{name} = {x:.3g} FLOP/B\n({why})",
                    xy=(x, 1.0 if top else 0.0), xycoords=("data", "axes fraction"),
                    xytext=(-3 if right else 3, -3 if top else 3), textcoords="offset points",
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize=8)

    # decode attention: in place on the CPU vs on the GPU with the KV cache pulled over the link
    ac = RESOURCE_COLORS["cpu"]
    ax.plot([attn.intensity_cpu] * 2, [attn.on_gpu_flops / TERA, attn.on_cpu_flops / TERA], color=ac, lw=1)
    ax.plot(attn.intensity_cpu, attn.on_cpu_flops / TERA, "o", color=ac, ms=9, mec="black",
            label=f"decode attention (ctx {ctx}), on CPU: I = {attn.intensity_cpu:.2g} FLOP/B")
    ax.plot(attn.intensity_cpu, attn.on_gpu_flops / TERA, "o", mfc="white", mec=ac, mew=2, ms=9,
            label="decode attention on GPU, KV cache over the link")

    # MoE FFN on the GPU with its CPU-resident experts streamed once per pass, at several (N, mu)
    balance, low = {}, {}
    for color, (mu, pts) in zip(_series_colors(len(ffn)), ffn.items()):
        x = [p.intensity_cpu for p in pts]
        y = [p.on_gpu_flops / TERA for p in pts]
        ax.plot(x, y, "s-", color=color, ms=7, mec="black", lw=1.2,
                label=f"MoE FFN on GPU, mu={mu} (N = {', '.join(str(n) for n in batches if n >= mu)})")
        i_gpu = pts[0].intensity_gpu
        xb = float(rl.balance_intensity_cpu(h, i_gpu))
        yb = min(h.gpu.mem_bytes_per_s * i_gpu, h.gpu.peak_flops)
        balance[mu] = (xb, yb)
        ax.plot(xb, yb / TERA, "D", color=color, ms=8, mec="black", mew=1.2)
        for p, n in zip(pts, [n for n in batches if n >= mu]):
            low[n] = min(low.get(n, (np.inf, 0.0)), (p.on_gpu_flops / TERA, p.intensity_cpu))
    for n, (y, x) in low.items():      # one label per N, below-right of its lowest marker
        ax.annotate(f"N={n}", (x, y), xytext=(5, -11), textcoords="offset points", fontsize=7.5)
    ax.plot([], [], "D", color="white", mec="black", label="balance point B_g I_gpu = B_cg I_cpu (per mu)")

    ax.set_xlim(x_lo, x_hi)
    y_lo = min(h.cpu.mem_bytes_per_s * x_lo, attn.on_gpu_flops, h.link_bytes_per_s * x_lo) / TERA
    ax.set_ylim(y_lo / 2, h.gpu.peak_flops / TERA * 3)
    ax.set_xlabel("operational intensity I (FLOP per byte read from the data's home memory)")
    ax.set_ylabel("attainable performance (TFLOP/s)")
    ax.grid(True, which="major", alpha=0.3)
    ax.text(0.01, 0.02, "below P1: compute where\nthe data lives (CPU)", transform=ax.transAxes, fontsize=8,
            color=RESOURCE_COLORS["cpu"], va="bottom")
    return {"p1": p1, "p2": p2, "balance": balance, "attention": attn, "moe_ffn": ffn, "hierarchy": h}


def roofline_figure(hw: HardwareProfile, spec: ModelSpec, batches: Sequence[int] = (16, 64, 256, 1024, 4096),
                    micro_batches: Sequence[int] = (8, 64, 512), ctx: int = 1024, weights_gpu_frac: float = 0.0):
    """The hierarchical roofline of `hw` with `spec`'s decode attention (context `ctx`) and its MoE FFN at
    every N in `batches` for each mu in `micro_batches` (mu <= N), r_w = `weights_gpu_frac`."""
    fig = new_figure(12, 6.5)
    ax = fig.add_subplot()
    info = draw_roofline(ax, hw, spec, batches, micro_batches, ctx, weights_gpu_frac)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="roofs and operators",
              title_fontsize=9)
    i_attn = info["attention"].intensity_cpu
    where = f"{info['p1'] / i_attn:.2g}x below" if i_attn < info["p1"] else "above"
    ax.set_title(f"Hierarchical roofline: {spec.name} on {hw.name}\n"
                 f"decode attention (I = {i_attn:.2g}) sits {where} P1 = {info['p1']:.3g}; "
                 "larger N moves the MoE FFN right along the link slope")
    fig.moe_lightning_data = info
    return fig
