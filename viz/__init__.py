"""Figures for MoE-Lightning: the hierarchical roofline, the (N, mu) throughput heatmap, the per-stage
breakdown of an estimate, predicted vs measured throughput, and the timeline of a recorded run.

Every public function returns a matplotlib Figure (built without pyplot, so nothing needs a display);
`save_figure` writes one atomically. Importing `viz` is cheap: matplotlib and the submodules load on
first use of a name.
"""
from __future__ import annotations

from hrm.lazy import lazy_exports

_EXPORTS = {
    "roofline_figure": "viz.roofline_plot",
    "throughput_heatmap": "viz.heatmap",
    "stage_breakdown_figure": "viz.breakdown",
    "memory_figure": "viz.breakdown",
    "baselines_figure": "viz.baselines_plot",
    "predicted_vs_measured_figure": "viz.validation",
    "error_table": "viz.validation",
    "error_by_micro_batches_figure": "viz.validation",
    "throughput_grid": "viz.grid",
    "ThroughputGrid": "viz.grid",
    "timeline_figure": "viz.timeline",
    "load_trace": "viz.timeline",
    "save_figure": "viz.save",
    "plot_for_estimate": "viz.cli",
    "plot_for_plan": "viz.cli",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
