"""Figures the command line writes: `moe-lightning estimate --plot FILE.png` and `plan --plot FILE.png`.

Both build a 2x2 panel and write it atomically; both return the path written.
"""
from __future__ import annotations

from pathlib import Path

from hrm.estimate import Estimate
from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload

from .save import save_figure
from .style import new_figure, policy_text


def _spread(values, ratio: float = 1.6) -> list[int]:
    """The values (earlier ones win) without any two closer than `ratio`, sorted: labels stay apart."""
    kept: list[int] = []
    for v in (max(1, int(v)) for v in values):
        if all(max(v, k) / min(v, k) >= ratio for k in kept):
            kept.append(v)
    return sorted(kept)


def _roofline_params(policy, workload: Workload):
    """N values around the policy's N, micro-batch sizes around its mu, the mean decode context."""
    N, mu = policy.batch_size, policy.micro_batch_size
    batches = _spread([N, mu, N * 4, N // 4, N // 16, mu // 4])
    micro = sorted(m for m in _spread([mu, mu * 4, mu // 4]) if m <= max(batches))
    ctx = int(workload.prompt_len + workload.gen_len / 2)
    return batches, micro, ctx


def _draw_roofline_panel(ax, hw, spec, policy, workload):
    from .roofline_plot import draw_roofline
    batches, micro, ctx = _roofline_params(policy, workload)
    streamed = policy.weights_gpu_frac < 1.0
    draw_roofline(ax, hw, spec, batches, micro, ctx, policy.weights_gpu_frac if streamed else 0.0, compact=True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7, frameon=False)
    note = (f"MoE FFN with r_w = {policy.weights_gpu_frac:.2f}" if streamed else
            "MoE FFN drawn as if streamed (this policy keeps every expert on the GPU)")
    ax.set_title(f"Hierarchical roofline of {hw.name}: where {spec.name}'s operators sit\n{note}", fontsize=9)


def _draw_heatmap_panel(ax, spec, hw, workload, policy, label, budgets, use_measured):
    from .grid import placement_of, throughput_grid
    from .heatmap import describe, draw_heatmap
    data = throughput_grid(spec, hw, workload, placement=placement_of(policy), budgets=budgets,
                           use_measured=use_measured, n_batch=36, n_micro=36)
    draw_heatmap(ax, data, policy, label)
    ax.legend(handles=ax._moe_legend_handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
              fontsize=7, frameon=False)
    ax.set_title(f"Predicted throughput over (N, mu)\n{describe(data)}", fontsize=9)
    return data


def _header(e: Estimate) -> str:
    wl = e.workload
    return (f"{e.model} on {e.hardware}: prompts {wl.prompt_len:g} tokens "
            f"({'padded' if wl.padded else 'avg'}), generate {wl.gen_len}\n"
            f"{policy_text(e.policy)}, {e.policy.schedule}: {e.throughput_tok_s:.4g} tok/s end to end "
            f"(prefill {e.prefill_s:.3g} s + decode {e.decode_s:.3g} s), decode bound by {e.bound_label}")


def estimate_figure(estimate: Estimate, spec: ModelSpec, hw: HardwareProfile, workload: Workload, *,
                    budgets=None, use_measured: bool = True):
    """2x2: decode stage times | memory; (N, mu) heatmap with this policy | roofline."""
    from .breakdown import _capacities, draw_decode_stages, draw_memory
    e = estimate
    fig = new_figure(17, 13)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.25])
    ax_dec, ax_mem = top.subplots(1, 2, width_ratios=[1.3, 1])
    ax_heat, ax_roof = bottom.subplots(1, 2)
    draw_decode_stages(ax_dec, e)
    draw_memory(ax_mem, e, *_capacities(hw, budgets))
    _draw_heatmap_panel(ax_heat, spec, hw, workload, e.policy, "this policy", budgets, use_measured)
    _draw_roofline_panel(ax_roof, hw, spec, e.policy, workload)
    fig.suptitle(_header(e), fontsize=12)
    return fig


def plot_for_estimate(estimate: Estimate, spec: ModelSpec, hw: HardwareProfile, workload: Workload, path, *,
                      budgets=None, use_measured: bool = True) -> Path:
    """Write the estimate figure (see estimate_figure) to `path`; returns the path.

    budgets: anything with gpu_bytes/cpu_bytes (optimizer.space.Budgets) for the heatmap's feasibility and
    the memory panel's budget lines (default: the optimizer's defaults for `hw`); use_measured: as given
    to hrm.estimate.estimate (False for --datasheet), so the heatmap prices cells the same way.
    """
    return save_figure(estimate_figure(estimate, spec, hw, workload, budgets=budgets, use_measured=use_measured),
                       path)


# ---------------------------------------------------------------------------------------------------
# plans

def _resolve_plan(plan, spec, hw, workload, budgets):
    """Model, machine, workload and budgets of a plan: given, on the plan, or by name."""
    e = plan.estimate
    if spec is None:
        spec = getattr(plan, "spec", None)
    if spec is None:
        from hrm.hf_config import load_model
        spec = load_model(e.model)
    if hw is None:
        hw = getattr(plan, "hardware", None)
        if not isinstance(hw, HardwareProfile):
            from hrm.hardware import load_profile
            hw = load_profile(e.hardware)
    workload = workload or getattr(plan, "workload", None) or e.workload
    budgets = budgets or getattr(plan, "budgets", None)
    return spec, hw, workload, budgets


def _baselines_for(plan, spec, hw, workload, budgets, use_measured):
    """optimizer.baselines.compare_baselines under the plan's budgets (grid solver: well under a second)."""
    from optimizer.baselines import compare_baselines
    from optimizer.search import make_problem
    return compare_baselines(make_problem(spec, hw, workload, budgets=budgets, use_measured=use_measured))


def plan_figure(plan, *, spec: ModelSpec | None = None, hw: HardwareProfile | None = None,
                workload: Workload | None = None, budgets=None, baselines=None, use_measured: bool | None = None):
    """2x2: (N, mu) heatmap with the chosen point | roofline; decode stage times | baselines.

    baselines: a mapping label -> Plan/Estimate/tok/s or a list of optimizer.baselines.BaselineResult;
    None: plan.baselines if present, else optimizer.baselines.compare_baselines under the plan's budgets;
    False (or empty): no baselines, the fourth panel shows memory by part instead."""
    from .baselines_plot import as_entries, draw_baselines
    from .breakdown import _capacities, draw_decode_stages, draw_memory
    spec, hw, workload, budgets = _resolve_plan(plan, spec, hw, workload, budgets)
    if use_measured is None:
        use_measured = bool(getattr(plan, "use_measured", True))
    e, policy = plan.estimate, plan.policy
    if baselines is None:
        baselines = getattr(plan, "baselines", None)
    if baselines is None:
        baselines = _baselines_for(plan, spec, hw, workload, budgets, use_measured)
    entries = as_entries(baselines or None)

    fig = new_figure(17, 14)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    ax_heat, ax_roof = top.subplots(1, 2)
    ax_dec, ax_right = bottom.subplots(1, 2)
    _draw_heatmap_panel(ax_heat, spec, hw, workload, policy, "chosen plan", budgets, use_measured)
    _draw_roofline_panel(ax_roof, hw, spec, policy, workload)
    draw_decode_stages(ax_dec, e)
    if entries:
        draw_baselines(ax_right, entries, "chosen plan", e.throughput_tok_s)
        ax_right.set_title("Chosen plan vs baselines (same model, same budgets)", fontsize=10)
    else:
        draw_memory(ax_right, e, *_capacities(hw, budgets))
    fig.suptitle("Plan: " + _header(e), fontsize=12)
    return fig


def plot_for_plan(plan, path, *, spec: ModelSpec | None = None, hw: HardwareProfile | None = None,
                  workload: Workload | None = None, budgets=None, baselines=None,
                  use_measured: bool | None = None) -> Path:
    """Write the plan figure (see plan_figure) to `path`; returns the path.

    Everything beyond `plan` is optional: by default taken from the plan (plan.spec, plan.hardware,
    plan.workload, plan.budgets) or loaded by the names in plan.estimate; baselines as in plan_figure.
    """
    return save_figure(plan_figure(plan, spec=spec, hw=hw, workload=workload, budgets=budgets,
                                   baselines=baselines, use_measured=use_measured), path)
