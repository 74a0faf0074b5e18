"""Policy search over the Hierarchical Roofline Model (hrm): the best N, mu, placement, resident experts
and KV fraction for a model, a machine and a workload, as a versioned `Plan`.

    from optimizer.search import search       # (optimizer.search is the module; the function is in it)
    plan = search(spec, hardware, workload)                  # grid solver, our full model
    plan = search(spec, hardware, workload, solver="milp")   # same equations as a pulp/CBC MILP
    plan = search(spec, hardware, workload, mode="paper")    # the MoE-Lightning artifact's model and search
    plan.save("plan.json"); Plan.load("plan.json")

Modules: space (budgets, placements, enumeration), grid (vectorised numpy), milp (pulp), search (the
entry point), paper (the artifact's model), baselines, plan (Plan + JSON). hrm + numpy + pulp only.
"""
from __future__ import annotations

from hrm.lazy import lazy_exports

_EXPORTS = {
    "make_problem": "optimizer.search", "best_policy": "optimizer.search",
    "Plan": "optimizer.plan", "PlanError": "optimizer.plan",
    "Budgets": "optimizer.space", "PlacementOption": "optimizer.space", "Pairs": "optimizer.space",
    "Resolution": "optimizer.space", "SearchError": "optimizer.space", "parse_size": "optimizer.space",
    "DEFAULT_PLACEMENTS": "optimizer.space",
    "compare_baselines": "optimizer.baselines", "BASELINES": "optimizer.baselines",
    "paper_search": "optimizer.paper",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
