"""The systems MoE-Lightning is compared with, priced by our model and searched under the same budgets.

Each baseline is a restricted placement; `compare_baselines` searches each for its own best N (and mu
where it has one), with the same solver and budgets as our plan, so the comparison is fair:
- FlexGen (S4): attention on the GPU with the KV cache streamed over PCIe, experts on the GPU; expert
  and KV fractions searched. (FlexGen moves a layer's weights as one block; our cost model does not
  distinguish whole-layer from paged transfers except through the measured H2D rate by size.)
- FlexGen(c) (S3): CPU attention next to the KV cache, without overlapping it with GPU work.
- DeepSpeed Zero-Inference: every expert streamed (r_w = 0), one micro-batch (mu = N), GPU attention,
  nothing overlapped (load a layer, then compute it); KV fraction on the GPU searched.
- All on GPU: the whole model and KV cache resident (r_w = 1, r_c = 1), attention on the GPU; only when
  it fits the GPU budget.
"""
from __future__ import annotations

from dataclasses import dataclass

from hrm.estimate import Estimate, estimate
from hrm.policy import Placement, Policy
from .plan import policy_of
from .search import best_policy, diagnose
from .space import PlacementOption, Problem
from hrm.units import format_size


@dataclass(frozen=True)
class Baseline:
    key: str
    label: str
    description: str
    placement: PlacementOption


BASELINES = (
    Baseline("flexgen", "FlexGen S4", "GPU attention, KV streamed",
             PlacementOption("flexgen-s4", Placement(True, True, "s4"))),
    Baseline("flexgen-c", "FlexGen(c) S3", "CPU attention, not overlapped",
             PlacementOption("flexgen-c-s3", Placement(False, True, "s3"))),
    Baseline("deepspeed", "DeepSpeed-Zero", "all experts streamed, one micro-batch, no overlap",
             PlacementOption("deepspeed-zero", Placement(True, True, "blocking"),
                       weights_gpu_frac=0.0, one_micro_batch=True)),
    Baseline("all-on-gpu", "All on GPU", "model and KV cache resident on the GPU",
             PlacementOption("all-on-gpu", Placement(True, True, "blocking"),
                       weights_gpu_frac=1.0, kv_gpu_frac=1.0)),
)


@dataclass(frozen=True)
class BaselineResult:
    baseline: Baseline
    policy: Policy | None          # None when nothing fits
    estimate: Estimate | None
    reason: str = ""               # why it is infeasible

    @property
    def throughput_tok_s(self) -> float:
        return self.estimate.throughput_tok_s if self.estimate is not None else 0.0

    def to_dict(self, ours_tok_s: float | None = None) -> dict:
        d = {"key": self.baseline.key, "label": self.baseline.label, "description": self.baseline.description,
             "feasible": self.estimate is not None, "reason": self.reason,
             "policy": None if self.policy is None else self.policy.__dict__,
             "throughput_tok_s": self.throughput_tok_s if self.estimate is not None else None,
             "decode_tok_s": self.estimate.decode_tok_s if self.estimate is not None else None,
             "bound": self.estimate.bound if self.estimate is not None else None}
        if ours_tok_s is not None:
            d["speedup"] = ours_tok_s / self.throughput_tok_s if self.estimate is not None else None
        return d


def run_baseline(problem: Problem, baseline: Baseline, *, solver: str = "grid") -> BaselineResult:
    found = best_policy(problem, (baseline.placement,), solver=solver)
    if found is None:
        if baseline.key == "all-on-gpu":
            reason = _all_on_gpu_reason(problem)
        else:
            reason = diagnose(problem, (baseline.placement,))
        return BaselineResult(baseline, None, None, reason)
    policy = policy_of(problem, found)
    est = estimate(problem.spec, problem.hardware, problem.workload, policy,
                   pin_all_weights=problem.pin_all_weights, use_measured=problem.use_measured)
    return BaselineResult(baseline, policy, est)


def compare_baselines(problem: Problem, *, solver: str = "grid", baselines=BASELINES) -> list[BaselineResult]:
    return [run_baseline(problem, b, solver=solver) for b in baselines]


def _all_on_gpu_reason(problem: Problem) -> str:
    spec, wl = problem.spec, problem.workload
    need = spec.weight_bytes + wl.max_context_len * spec.kv_bytes_per_token
    return (f"the model and one sequence's KV cache need {format_size(need)} of GPU memory, "
            f"budget {format_size(problem.budgets.gpu_bytes)}")
