"""Shared look: colours per resource, figure creation without pyplot, number formatting.

Figures are built on `matplotlib.figure.Figure` directly, so no GUI backend is ever selected (headless
machines need no MPLBACKEND) and no global pyplot state accumulates; `savefig` renders with Agg.
"""
from __future__ import annotations

RESOURCE_COLORS = {
    "gpu": "#2ca02c",          # green: GPU compute
    "cpu": "#1f77b4",          # blue: CPU attention / compute
    "h2d": "#d62728",          # red: CPU->GPU link
    "h2d_weights": "#d62728",
    "h2d_act": "#ff9896",
    "h2d_kv": "#8c564b",
    "d2h": "#9467bd",          # purple: GPU->CPU link
    "link": "#e377c2",         # pink: both directions
    "pipeline": "#7f7f7f",     # grey: latency of one micro-batch round trip
    "serial": "#bcbd22",
}
RESOURCE_NAMES = {
    "gpu": "GPU compute",
    "cpu": "CPU attention / experts",
    "h2d": "CPU->GPU link",
    "h2d_weights": "CPU->GPU: expert weights",
    "h2d_act": "CPU->GPU: activations",
    "h2d_kv": "CPU->GPU: KV cache",
    "d2h": "GPU->CPU link",
    "link": "link, both directions",
    "pipeline": "pipeline round trip",
    "serial": "sum of stages (no overlap)",
}
HIGHLIGHT = "#ff7f0e"


def new_figure(width: float, height: float, **kw):
    """A Figure not registered with pyplot (displays inline in Jupyter, saves with Agg)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout=kw.pop("layout", "constrained"), **kw)


def policy_text(policy) -> str:
    """Short policy label: N, mu, r_w and where attention runs."""
    where = "GPU" if policy.attention_on_gpu else "CPU"
    return (f"N={policy.batch_size}, mu={policy.micro_batch_size}, r_w={policy.weights_gpu_frac:.2f}, "
            f"attention on {where}")
