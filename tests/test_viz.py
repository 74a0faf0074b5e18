"""viz: every figure has a title, labelled axes (with units) and a legend; the heatmap's data marks the
cells that break a memory budget; figures are written atomically as valid PNGs."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from hrm.estimate import estimate
from hrm.hardware import load_profile
from hrm.hf_config import load_model
from hrm.policy import Policy
from hrm.spec import Workload
from viz import grid as vg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def target():
    """Mixtral-8x7B on the paper's T4 host, MTBench padded (s = 418, n = 128)."""
    return load_model("mixtral-8x7b"), load_profile("t4-s1"), Workload.uniform(418, 128, padded=True)


def _main_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _titles(fig):
    texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    for sub in getattr(fig, "subfigs", []):
        if sub._suptitle is not None:
            texts.append(sub._suptitle.get_text())
    return texts + [ax.get_title() for ax in fig.axes]


def assert_readable(fig):
    """A title; every plotting axes labelled with a unit in parentheses (category axes may carry tick
    labels instead); at least one legend."""
    from matplotlib.figure import Figure
    assert isinstance(fig, Figure)
    assert any(t.strip() for t in _titles(fig)), "figure has no title"
    axes = _main_axes(fig)
    assert axes, "figure has no axes"
    for ax in axes:
        for which, label, ticks in (("x", ax.get_xlabel(), ax.get_xticklabels()),
                                    ("y", ax.get_ylabel(), ax.get_yticklabels())):
            if label:
                assert "(" in label and ")" in label, f"{which} label without a unit: {label!r}"
            else:
                categories = [t.get_text() for t in ticks if t.get_text()]
                assert categories and not all(_is_number(c) for c in categories), \
                    f"{ax.get_title()!r}: unlabelled {which} axis"
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None] + list(fig.legends)
    assert legends, "figure has no legend"
    assert all(len(lg.get_texts()) > 0 for lg in legends)


def _is_number(text: str) -> bool:
    try:
        float(text.replace("\u2212", "-"))
        return True
    except ValueError:
        return False


def test_import_viz_is_cheap():
    code = "import sys, viz; assert 'matplotlib' not in sys.modules, 'viz imported matplotlib'; print(viz.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "roofline_figure" in out.stdout


# ---------------------------------------------------------------------------------------------------
# the numbers behind the heatmap

@pytest.mark.parametrize("policy", [
    Policy(504, 36),
    Policy(100, 7, weights_gpu_frac=0.25),
    Policy(64, 64, attention_on_gpu=True, kv_gpu_frac=0.3, schedule="s4"),
    Policy(96, 32, schedule="blocking"),
    Policy(96, 32, schedule="s3"),
    Policy(50, 10, ffn_on_gpu=False, weights_gpu_frac=0.5),
])
def test_grid_cell_equals_estimate(target, policy):
    spec, hw, wl = target
    g = vg.throughput_grid(spec, hw, wl, [policy.batch_size], [policy.micro_batch_size],
                           weights_gpu_frac=policy.weights_gpu_frac, kv_gpu_frac=policy.kv_gpu_frac,
                           attention_on_gpu=policy.attention_on_gpu, ffn_on_gpu=policy.ffn_on_gpu,
                           schedule=policy.schedule)
    e = estimate(spec, hw, wl, policy)
    assert g.throughput_tok_s[0, 0] == pytest.approx(e.throughput_tok_s, rel=1e-9)
    assert g.gpu_bytes[0, 0] == pytest.approx(e.memory.gpu_bytes, rel=1e-9)
    assert g.cpu_bytes[0, 0] == pytest.approx(e.memory.cpu_bytes, rel=1e-9)


def _splitting_budgets(spec, hw, wl, **grid_kw):
    """Budgets that cut the grid inside its axes: the GPU one halfway between the GPU memory of the
    cells with one sequence per micro-batch and of those with one micro-batch (no expert resident), since with prefill in chunks the GPU need
    grows only slowly with N and a fixed fraction of a card need not bind anywhere."""
    from hrm.estimate import Setting, memory_use
    axes = vg.throughput_grid(spec, hw, wl, budgets=vg.MemoryBudgets(1e18, 1e18), **grid_kw)
    s = Setting.of(spec, hw, wl, Policy(1, 1))
    cpu_bytes = 0.8 * hw.cpu.memory_bytes
    fits_cpu = [int(n) for n in axes.batch_sizes if memory_use(s, int(n), 1, 0.0, 0.0).cpu_bytes <= cpu_bytes]
    # per-sequence state grows the GPU need with N too: between the most at mu = 1 and the most at mu = N
    lo = max(memory_use(s, n, 1, 0.0, 0.0).gpu_bytes for n in fits_cpu)
    hi = max(memory_use(s, n, n, 0.0, 0.0).gpu_bytes for n in fits_cpu)   # workspaces differ by MoE path
    return vg.MemoryBudgets(gpu_bytes=(lo + hi) / 2, cpu_bytes=cpu_bytes)


def test_grid_marks_cells_by_the_budget_they_break(target):
    spec, hw, wl = target
    budgets = _splitting_budgets(spec, hw, wl, n_batch=24, n_micro=24)
    g = vg.throughput_grid(spec, hw, wl, budgets=budgets, n_batch=24, n_micro=24)
    codes = set(np.unique(g.status).tolist())
    assert {vg.FEASIBLE, vg.GPU_LIMIT, vg.CPU_LIMIT, vg.NOT_APPLICABLE} <= codes
    gpu_over = g.gpu_bytes > budgets.gpu_bytes
    cpu_over = g.cpu_bytes > budgets.cpu_bytes
    feas = g.status == vg.FEASIBLE
    assert not (gpu_over | cpu_over)[feas].any()
    assert gpu_over[g.status == vg.GPU_LIMIT].all()       # at the r_w that uses the least GPU memory
    assert cpu_over[g.status == vg.CPU_LIMIT].all()
    # mu > N is never priced as a policy
    N, mu = np.meshgrid(g.batch_sizes, g.micro_batch_sizes)
    assert ((g.status == vg.NOT_APPLICABLE) == (mu > N)).all()
    assert np.isnan(g.throughput_tok_s[mu > N]).all()
    # every feasible cell re-checked with estimate(): within both budgets at the r_w the grid chose
    i, j = np.argwhere(feas)[len(np.argwhere(feas)) // 2]
    e = estimate(spec, hw, wl, Policy(int(g.batch_sizes[j]), int(g.micro_batch_sizes[i]),
                                      weights_gpu_frac=float(g.weights_gpu_frac[i, j])))
    assert e.memory.gpu_bytes <= budgets.gpu_bytes and e.memory.cpu_bytes <= budgets.cpu_bytes
    assert e.throughput_tok_s == pytest.approx(g.throughput_tok_s[i, j], rel=1e-9)
    # the best cell beats every other feasible cell
    n, m, rw, t = g.best()
    assert t == pytest.approx(np.nanmax(np.where(feas, g.throughput_tok_s, np.nan)))


@pytest.mark.parametrize("profile", ["t4-s1", "h200"])
def test_grid_best_is_the_optimizers_plan(profile):
    """Over the same (N, mu) pairs and placement, the grid's best cell is the plan search() returns."""
    from optimizer.search import search
    from optimizer.space import Pairs
    spec, hw, wl = load_model("mixtral-8x7b"), load_profile(profile), Workload.uniform(418, 128, padded=True)
    for attention_on_gpu in (False, True):
        g = vg.throughput_grid(spec, hw, wl, n_batch=12, n_micro=12, attention_on_gpu=attention_on_gpu)
        plan = search(spec, hw, wl, placements=(g.placement,),
                      pairs=Pairs(tuple(int(n) for n in g.batch_sizes), tuple(int(m) for m in g.micro_batch_sizes)))
        n, mu, rw, tok_s = g.best()
        assert tok_s == pytest.approx(plan.throughput_tok_s, rel=1e-9)
        assert (n, mu) == (plan.policy.batch_size, plan.policy.micro_batch_size)


def test_grid_with_nothing_feasible(target):
    spec, hw, wl = target
    g = vg.throughput_grid(spec, hw, wl, [1, 8], [1, 8], budgets=vg.MemoryBudgets(1e6, 1e6))
    assert not g.feasible.any() and g.best() is None
    assert (g.status[g.status != vg.NOT_APPLICABLE] == vg.GPU_AND_CPU_LIMIT).all()


def test_best_rw_per_cell_uses_gpu_memory_when_it_helps():
    spec, hw = load_model("mixtral-8x7b"), load_profile("h200")
    g = vg.throughput_grid(spec, hw, Workload.uniform(256, 32), [256], [64])
    assert g.weights_gpu_frac[0, 0] > 0      # 139 GiB of HBM holds most experts
    fixed = vg.throughput_grid(spec, hw, Workload.uniform(256, 32), [256], [64], weights_gpu_frac=0.0)
    assert g.throughput_tok_s[0, 0] > fixed.throughput_tok_s[0, 0]


# ---------------------------------------------------------------------------------------------------
# figures

def test_roofline_figure(target):
    from viz import roofline_figure
    spec, hw, _ = target
    fig = roofline_figure(hw, spec, batches=(16, 256, 4096), micro_batches=(8, 64))
    assert_readable(fig)
    ax = _main_axes(fig)[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    info = fig.moe_lightning_data
    assert info["p1"] == pytest.approx(0.8e12 / 12.5e9)                   # P_cpu / B_link = 64
    assert info["attention"].intensity_cpu < info["p1"]                   # why attention stays on the CPU
    assert info["attention"].on_cpu_flops > info["attention"].on_gpu_flops
    xs = [p.intensity_cpu for p in info["moe_ffn"][8]]
    assert xs == sorted(xs) and xs[-1] > 100 * xs[0]                     # N moves the MoE FFN right
    labels = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    for word in ("GPU roof", "CPU roof", "link", "attention", "MoE FFN", "balance point"):
        assert word in labels


def test_throughput_heatmap_marks_infeasible_and_chosen(target):
    from matplotlib.collections import PatchCollection
    from viz import throughput_heatmap
    spec, hw, wl = target
    budgets = _splitting_budgets(spec, hw, wl, n_batch=16, n_micro=16)
    fig = throughput_heatmap(spec, hw, wl, chosen=Policy(504, 36), n_batch=16, n_micro=16, budgets=budgets)
    assert_readable(fig)
    g = fig.moe_lightning_data
    assert isinstance(g, vg.ThroughputGrid)
    assert (g.status == vg.GPU_LIMIT).any() and (g.status == vg.CPU_LIMIT).any() and g.feasible.any()
    ax = _main_axes(fig)[0]
    shaded = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(shaded) == len(set(np.unique(g.status).tolist()) - {vg.FEASIBLE})
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert len(stars) == 1 and (stars[0].get_xdata()[0], stars[0].get_ydata()[0]) == (504, 36)
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "GPU memory budget" in legend and "CPU memory budget" in legend
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_heatmap_placement_follows_arguments_then_chosen_policy(target):
    from viz import throughput_heatmap
    spec, hw, wl = target
    fig = throughput_heatmap(spec, hw, wl, attention_on_gpu=True, n_batch=6, n_micro=6)
    p = fig.moe_lightning_data.placement
    assert p.attention_on_gpu and p.schedule == "s4" and p.kv_gpu_frac is None
    assert "attention GPU" in _main_axes(fig)[0].get_title()
    chosen = Policy(64, 8, ffn_on_gpu=False)
    p = throughput_heatmap(spec, hw, wl, chosen=chosen, n_batch=6, n_micro=6).moe_lightning_data.placement
    assert (p.attention_on_gpu, p.ffn_on_gpu, p.schedule) == (False, False, "cgopipe")


def test_heatmap_of_a_model_that_does_not_fit(target):
    from viz import throughput_heatmap
    spec, hw, wl = target
    fig = throughput_heatmap(load_model("deepseek-v3"), hw, wl, n_batch=8, n_micro=8)
    assert_readable(fig)
    assert not fig.moe_lightning_data.feasible.any()


@pytest.mark.parametrize("policy", [Policy(504, 36), Policy(128, 128, schedule="blocking"),
                                    Policy(1080, 60, schedule="s3"),
                                    Policy(64, 64, attention_on_gpu=True, schedule="s4")])
def test_stage_breakdown_figure(target, policy):
    from viz import stage_breakdown_figure
    spec, hw, wl = target
    e = estimate(spec, hw, wl, policy)
    fig = stage_breakdown_figure(e, hw)
    assert_readable(fig)
    titles = " ".join(_titles(fig))
    assert e.bound_label in titles
    decode_ax = next(ax for ax in fig.axes if ax.get_title().startswith("Decode"))
    legend = " ".join(t.get_text() for t in decode_ax.get_legend().get_texts())
    assert f"binding: {e.bound_label}" in legend
    bound_bars = [p for p in decode_ax.patches if not p.get_fill()]          # the outlined (binding) bar
    assert len(bound_bars) == 1
    assert bound_bars[0].get_width() == pytest.approx(e.layer_time_s * 1e3)   # it sets the layer time (ms)
    assert stage_breakdown_figure(e) is not None     # without a profile: memory in GB


def _validation_frame():
    return pd.DataFrame({
        "policy": ["A", "A", "B", "C"],
        "predicted_tok_s": [110.0, 90.0, 50.0, 8.0],
        "measured_tok_s": [100.0, 100.0, 40.0, 10.0],
    })


def test_predicted_vs_measured_figure():
    from viz import error_table, predicted_vs_measured_figure
    df = _validation_frame()
    table = error_table(df)
    assert table.loc["A", "runs"] == 2
    assert table.loc["A", "error_pct"] == pytest.approx(0.0)
    assert table.loc["A", "abs_error_pct"] == pytest.approx(10.0)
    assert table.loc["B", "error_pct"] == pytest.approx(25.0)
    assert table.loc["C", "error_pct"] == pytest.approx(-20.0)
    fig = predicted_vs_measured_figure(df)
    assert_readable(fig)
    scatter = _main_axes(fig)[0]
    assert any(ln.get_label().startswith("y = x") for ln in scatter.get_lines())
    with pytest.raises(ValueError, match="measured_tok_s"):
        predicted_vs_measured_figure(df.drop(columns=["measured_tok_s"]))


def test_error_by_micro_batches_figure():
    from viz import error_by_micro_batches_figure
    df = _validation_frame().assign(policy_batch_size=[100, 100, 64, 8], policy_micro_batch_size=[10, 10, 16, 8],
                                    policy_schedule=["cgopipe", "cgopipe", "s3", "s4"], source="v.csv")
    fig = error_by_micro_batches_figure(df)
    assert_readable(fig)
    assert fig.moe_lightning_data["micro_batches"] == [10, 10, 4, 1]
    assert fig.moe_lightning_data["error_pct"] == pytest.approx([10.0, -10.0, 25.0, -20.0])
    with pytest.raises(ValueError, match="policy_schedule"):
        error_by_micro_batches_figure(df.drop(columns=["policy_schedule"]))


def test_baselines_figure(target):
    from viz import baselines_figure
    spec, hw, wl = target
    chosen = estimate(spec, hw, wl, Policy(504, 36))
    fig = baselines_figure({"FlexGen (S4)": estimate(spec, hw, wl, Policy(64, 64, attention_on_gpu=True,
                                                                             schedule="s4")),
                            "DeepSpeed-style": 12.5, "all on GPU": None}, chosen=chosen)
    assert_readable(fig)
    ticks = [t.get_text() for t in _main_axes(fig)[0].get_yticklabels()]
    assert ticks[0] == "MoE-Lightning plan" and ticks[-1] == "all on GPU"


# ---------------------------------------------------------------------------------------------------
# writing files

def _assert_png(path):
    from matplotlib.image import imread
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_save_figure_is_atomic_and_writes_png(tmp_path):
    from viz import save_figure
    from viz.style import new_figure
    fig = new_figure(3, 2)
    ax = fig.add_subplot()
    ax.plot([1, 2], [3, 4])
    target = tmp_path / "sub" / "fig.png"
    assert save_figure(fig, target) == target
    _assert_png(target)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask        # not mkstemp's 0600
    inode = target.stat().st_ino
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "sub" / "fig.notaformat")
    assert sorted(p.name for p in target.parent.iterdir()) == ["fig.png"]    # no temporary left behind
    save_figure(fig, target)            # replacing an existing file: a new file moved into place
    _assert_png(target)
    assert target.stat().st_ino != inode


def test_plot_for_estimate(target, tmp_path):
    from viz.cli import estimate_figure, plot_for_estimate
    spec, hw, wl = target
    e = estimate(spec, hw, wl, Policy(504, 36))
    out = plot_for_estimate(e, spec, hw, wl, tmp_path / "est.png")
    _assert_png(out)
    assert_readable(estimate_figure(e, spec, hw, wl))


def test_plot_for_plan_from_a_plan_like_object(target, tmp_path):
    from viz.cli import plan_figure, plot_for_plan
    spec, hw, wl = target
    e = estimate(spec, hw, wl, Policy(504, 36))
    plan = SimpleNamespace(policy=e.policy, estimate=e,
                           baselines={"FlexGen(c) (S3)": estimate(spec, hw, wl, Policy(504, 36, schedule="s3"))})
    _assert_png(plot_for_plan(plan, tmp_path / "plan.png"))       # spec and profile found by name
    fig = plan_figure(plan)
    assert_readable(fig)
    assert any("baselines" in ax.get_title() for ax in fig.axes)
    bare = SimpleNamespace(policy=e.policy, estimate=e)
    assert any("Memory" in ax.get_title() for ax in plan_figure(bare, spec=spec, hw=hw, baselines=False).axes)


def test_plot_for_plan_from_search(target, tmp_path):
    """A real Plan: baselines are priced under its budgets when the plan carries none."""
    from optimizer.search import search
    from viz.cli import plan_figure, plot_for_plan
    spec, hw, wl = target
    plan = search(spec, hw, wl)
    fig = plan_figure(plan)
    assert_readable(fig)
    heat = fig.axes[0]
    stars = [ln for ln in heat.get_lines() if ln.get_marker() == "*"]
    assert (stars[0].get_xdata()[0], stars[0].get_ydata()[0]) == (plan.policy.batch_size, plan.policy.micro_batch_size)
    bars = next(ax for ax in fig.axes if "baselines" in ax.get_title())
    names = [t.get_text() for t in bars.get_yticklabels()]
    assert names[0] == "chosen plan" and len(names) >= 4
    _assert_png(plot_for_plan(plan, tmp_path / "plan.png"))


# ---------------------------------------------------------------------------------------------------
# what-if sweeps and validation files

def test_whatif_sweep_and_figure(target):
    from viz import whatif
    spec, hw, wl = target
    sweeps = {"host memory": whatif.sweep(spec, wl, whatif.cpu_memory_variants(hw, (32, 192))),
              "PCIe generation": whatif.sweep(spec, wl, whatif.pcie_variants(hw, ("PCIe 3.0", "PCIe 5.0")))}
    host = sweeps["host memory"]
    assert np.isnan(host["throughput_tok_s"][0]) and host["reason"][0]          # 32 GB cannot hold the experts
    assert host["throughput_tok_s"][1] > 0
    pcie = sweeps["PCIe generation"]
    assert pcie["link_gb_per_s"].tolist() == pytest.approx([12.5, 50.0])
    assert pcie["throughput_tok_s"][1] >= pcie["throughput_tok_s"][0]           # a faster link never hurts
    assert_readable(whatif.policy_shift_figure(sweeps))


def test_load_validation_normalises_columns(tmp_path):
    from viz.validation import load_validation
    pd.DataFrame({"batch_size": [504, 64], "micro_batch_size": [36, 64], "predicted_tokens_per_s": [60.0, 9.0],
                  "tokens_per_s": [50.0, 10.0]}).to_csv(tmp_path / "validation_t4.csv", index=False)
    pd.DataFrame({"policy": ["x"], "predicted_tok_s": [1.0], "measured_tok_s": [2.0]}).to_csv(
        tmp_path / "validation_h200.csv", index=False)
    df = load_validation(str(tmp_path / "validation*.csv"))
    assert len(df) == 3
    assert set(df["policy"]) == {"N=504 mu=36", "N=64 mu=64", "x"}
    assert set(df["source"]) == {"validation_t4.csv", "validation_h200.csv"}
    with pytest.raises(FileNotFoundError):
        load_validation(str(tmp_path / "nothing*.csv"))
