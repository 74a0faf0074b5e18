"""Predicted end-to-end throughput over (N, mu), infeasible cells shaded by the memory limit they break."""
from __future__ import annotations

import numpy as np

from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload

from . import grid as g
from hrm.units import format_size

from .style import new_figure

INFEASIBLE_STYLE = {   # status -> (face colour, hatch)
    g.GPU_LIMIT: ("#f4b6b6", "//"),
    g.CPU_LIMIT: ("#b6cdf4", "\\\\"),
    g.GPU_AND_CPU_LIMIT: ("#d9c2ec", "xx"),
    g.NOT_APPLICABLE: ("#f2f2f2", ""),
}
SHORT = {g.GPU_LIMIT: "over GPU\nmemory budget", g.CPU_LIMIT: "over CPU\nmemory budget",
         g.GPU_AND_CPU_LIMIT: "over both\nbudgets", g.NOT_APPLICABLE: "mu > N"}


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around geometrically spaced centres."""
    v = np.asarray(values, float)
    if len(v) == 1:
        return np.array([v[0] / 1.5, v[0] * 1.5])
    mid = np.sqrt(v[:-1] * v[1:])
    return np.concatenate([[v[0] ** 2 / mid[0]], mid, [v[-1] ** 2 / mid[-1]]])


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """1-2-5 ticks written as plain numbers on a log axis."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter
    decades = np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    ticks = [m * 10 ** d for d in decades for m in (1, 2, 5) if lo <= m * 10 ** d <= hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))


def _policy_of(chosen):
    """A Policy from a Policy, a Plan (has .policy), an Estimate (has .policy), or None."""
    if chosen is None or isinstance(chosen, tuple):
        return None
    return getattr(chosen, "policy", chosen)


def _chosen_point(chosen):
    if chosen is None:
        return None
    if isinstance(chosen, tuple):
        return int(chosen[0]), int(chosen[1])
    p = _policy_of(chosen)
    return p.batch_size, p.micro_batch_size


def draw_heatmap(ax, grid: g.ThroughputGrid, chosen=None, chosen_label: str = "optimizer's choice",
                 colorbar: bool = True, annotate: bool = True):
    """Draw `grid` on `ax`; returns the colour mesh (None when no cell is feasible)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    xe, ye = _edges(grid.batch_sizes), _edges(grid.micro_batch_sizes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    tput = np.ma.masked_where(~grid.feasible, grid.throughput_tok_s)
    mesh = None
    if grid.feasible.any():
        from matplotlib.colors import LogNorm
        lo, hi = float(tput.min()), float(tput.max())
        norm = LogNorm(vmin=lo, vmax=hi) if hi > 20 * lo > 0 else None    # wide ranges: log colours
        mesh = ax.pcolormesh(xe, ye, tput, cmap="viridis", shading="flat", norm=norm)
        if colorbar:
            cb = ax.figure.colorbar(mesh, ax=ax, label="predicted throughput (generated tok/s)")
            if norm is not None:
                _plain_log_ticks(cb.ax.yaxis, lo, hi)
    handles = []
    for status, (face, hatch) in INFEASIBLE_STYLE.items():
        cells = np.argwhere(grid.status == status)
        if len(cells) == 0:
            continue
        rects = [Rectangle((xe[j], ye[i]), xe[j + 1] - xe[j], ye[i + 1] - ye[i]) for i, j in cells]
        ax.add_collection(PatchCollection(rects, facecolor=face, edgecolor="#777777" if hatch else face,
                                          hatch=hatch, linewidth=0.0))
        handles.append(Patch(facecolor=face, edgecolor="#777777", hatch=hatch, label=g.STATUS_LABELS[status]))
        if annotate and status != g.NOT_APPLICABLE and len(cells) >= 6:
            i, j = np.median(cells[:, 0]), np.median(cells[:, 1])
            x = np.exp(np.interp(j, np.arange(len(grid.batch_sizes)), np.log(grid.batch_sizes)))
            y = np.exp(np.interp(i, np.arange(len(grid.micro_batch_sizes)), np.log(grid.micro_batch_sizes)))
            ax.text(x, y, SHORT[status], ha="center", va="center", fontsize=8, weight="bold",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))

    best = grid.best()
    if best is not None:
        n, mu, rw, t = best
        handles.append(ax.plot(n, mu, "o", ms=10, mfc="none", mec="white", mew=2.2,
                               label=f"grid optimum: N={n}, mu={mu}, r_w={rw:.2f} ({t:.4g} tok/s)")[0])
    pt = _chosen_point(chosen)
    if pt is not None:
        handles.append(ax.plot(*pt, "*", ms=18, color="#ff3030", mec="black", mew=1.2,
                               label=f"{chosen_label}: N={pt[0]}, mu={pt[1]}")[0])
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xlabel("batch size N (sequences per pass)")
    ax.set_ylabel("micro-batch size mu (sequences)")
    ax._moe_legend_handles = handles
    return mesh


def throughput_heatmap(spec: ModelSpec, hw: HardwareProfile, workload: Workload, batch_sizes=None,
                       micro_batch_sizes=None, *, chosen=None, chosen_label: str = "optimizer's choice",
                       placement=None, attention_on_gpu=None, ffn_on_gpu=None, schedule=None,
                       weights_gpu_frac=None, kv_gpu_frac=None, budgets=None, **grid_kw):
    """Predicted end-to-end throughput over (N, mu) with infeasible cells shaded by the budget they break.

    batch_sizes, micro_batch_sizes: the grid (default: ~40 geometric values each, reaching past the limits).
    chosen: a Policy, a Plan or Estimate (anything with .policy) or an (N, mu) tuple, marked with a star.
    placement: an optimizer.space.PlacementOption; default built from attention_on_gpu / ffn_on_gpu / schedule
        where given, else the chosen policy's, else the paper's (CPU attention, experts on GPU, CGOPipe).
    weights_gpu_frac, kv_gpu_frac: fixed r_w / r_c, or None for the optimizer's choice in each cell.
    budgets: anything with gpu_bytes and cpu_bytes (optimizer.space.Budgets; a Plan's .budgets); default
        the chosen plan's budgets if it has them, else the optimizer's defaults for `hw`.
    grid_kw: more viz.grid.throughput_grid arguments (use_measured, pin_all_weights, n_batch, n_micro, ...).
    The grid used is attached as `fig.moe_lightning_data` (a viz.grid.ThroughputGrid).
    """
    if placement is None:
        placement = g.placement_of(_policy_of(chosen), attention_on_gpu=attention_on_gpu, ffn_on_gpu=ffn_on_gpu,
                                   schedule=schedule, weights_gpu_frac=weights_gpu_frac, kv_gpu_frac=kv_gpu_frac)
    if budgets is None:
        budgets = getattr(chosen, "budgets", None)
    data = g.throughput_grid(spec, hw, workload, batch_sizes, micro_batch_sizes, placement=placement,
                             budgets=budgets, **grid_kw)
    fig = new_figure(9.5, 7)
    ax = fig.add_subplot()
    draw_heatmap(ax, data, chosen, chosen_label)
    ax.legend(handles=ax._moe_legend_handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2,
              fontsize=8, frameon=False)
    ax.set_title(f"Predicted throughput over (N, mu): {data.label}\n{describe(data)}")
    fig.moe_lightning_data = data
    return fig


def describe(data: g.ThroughputGrid) -> str:
    """One line: placement, which fractions are searched, budgets."""
    p = data.placement
    fixed = []
    fixed.append("r_w searched" if p.weights_gpu_frac is None else f"r_w = {p.weights_gpu_frac:g}")
    if p.attention_on_gpu:
        fixed.append("r_c searched" if p.kv_gpu_frac is None else f"r_c = {p.kv_gpu_frac:g}")
    return (f"{p.describe()}; {', '.join(fixed)} per cell; budgets GPU {format_size(data.gpu_budget_bytes)}, "
            f"CPU {format_size(data.cpu_budget_bytes)}")
