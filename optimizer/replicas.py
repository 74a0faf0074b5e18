"""Engine replicas that share a node, priced by the same model as one: each replica is planned on its share
of the node (a HardwareProfile view) under its share of the node's budgets.

    node: G GPUs, L CPU-GPU links, C cores, M host memory, B DRAM bandwidth
    K replicas -> each: G/K GPUs (K | G), or 1/(K/G) of one GPU (G | K: memory and rates shared);
                        L/K links (one link at that share where L/K is not a whole number);
                        C/K cores, M/K host memory, B/K DRAM bandwidth (CPU attention rates with it)

A replica is its own process: it pays its own process baseline and CUDA context inside its share (the memory
account does that), and holds its own copy of the offloaded weights. The node's throughput is K times a
replica's; `choose` picks the K with the most.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload

from .space import Budgets, SearchError


def check_replicas(hw: HardwareProfile, k: int) -> None:
    g = hw.gpu.count
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SearchError(f"replicas per node must be an integer >= 1, got {k!r}")
    if g % k and k % g:
        raise SearchError(f"{k} replicas per node on {hw.name} ({g} GPUs): each replica needs a whole number of "
                          f"GPUs or an equal share of one (a divisor or a multiple of {g})")
    cores = hw.cpu.cores
    if cores and k > cores:
        raise SearchError(f"{k} replicas per node on {hw.name}: more replicas than its {cores} CPU cores")


def replica_view(hw: HardwareProfile, k: int) -> HardwareProfile:
    """The share of node `hw` one of `k` replicas on it gets, as a profile the cost model prices as it is."""
    check_replicas(hw, k)
    if k == 1:
        return hw
    g, links = hw.gpu.count, hw.num_links
    gpu_share = min(1.0, g / k)                      # of one GPU, where replicas share GPUs
    link_share = links / k                           # link-equivalents per replica
    whole_links = link_share >= 1 and link_share == int(link_share) and g % k == 0
    view = hw.scaled(link=1.0 if whole_links else link_share, cpu_mem_bw=1.0 / k, gpu_flops=gpu_share)
    m = view.measured
    if m is not None and gpu_share < 1:
        m = replace(m, gpu_hbm_bytes_per_s=m.gpu_hbm_bytes_per_s * gpu_share)
    gpu = replace(hw.gpu, count=max(1, g // k), peak_flops=view.gpu.peak_flops,
                  memory_bytes=hw.gpu.memory_bytes * gpu_share, mem_bytes_per_s=hw.gpu.mem_bytes_per_s * gpu_share)
    cpu = replace(view.cpu, memory_bytes=hw.cpu.memory_bytes / k, cores=hw.cpu.cores // k if hw.cpu.cores else 0,
                  peak_flops={d: f / k for d, f in hw.cpu.peak_flops.items()})
    link = view.link if whole_links else replace(view.link, gpus_per_link=gpu.count)
    return replace(view, name=f"{hw.name} (1 of {k} replicas)", gpu=gpu, cpu=cpu, link=link, measured=m,
                   description=f"{hw.description}; one of {k} replicas sharing the node")


def replica_budgets(node: Budgets, k: int) -> Budgets:
    """A replica's share of the node's budgets (all GPUs together, host memory): a k-th of each."""
    if k == 1:
        return node
    share = f", 1/{k} each ({k} replicas on the node)"
    return Budgets(gpu_bytes=node.gpu_bytes / k, cpu_bytes=node.cpu_bytes / k,
                   gpu_source=node.gpu_source + share, cpu_source=node.cpu_source + share,
                   gpu_total_bytes=node.gpu_total_bytes / k, cpu_total_bytes=node.cpu_total_bytes / k)


def plan_replica(spec: ModelSpec, hw: HardwareProfile, workload: Workload, k: int, *, gpu_memory=None,
                 cpu_memory=None, gpu_frac=None, cpu_frac=None, **search_kw):
    """The best plan for one of `k` replicas on node `hw`: its view, its share of the node's budgets (the
    flags describe the node: --gpu-memory per GPU, --cpu-memory the node's host memory)."""
    from .search import search
    node = Budgets.from_hardware(hw, gpu_memory=gpu_memory, cpu_memory=cpu_memory, gpu_frac=gpu_frac,
                                 cpu_frac=cpu_frac)
    return search(spec, replica_view(hw, k), workload, budgets=replica_budgets(node, k), **search_kw)


def candidate_counts(hw: HardwareProfile) -> list[int]:
    """Replicas per node worth pricing: every divisor of its GPUs, and two replicas per GPU."""
    g = hw.gpu.count
    out = [k for k in range(1, g + 1) if g % k == 0] + [2 * g]
    return [k for k in out if not hw.cpu.cores or k <= hw.cpu.cores]


@dataclass(frozen=True)
class ReplicaOption:
    replicas_per_node: int
    plan: object | None             # optimizer.plan.Plan of one replica; None where nothing fits
    reason: str = ""                # why not, where plan is None

    @property
    def node_tok_s(self) -> float:
        return self.replicas_per_node * self.plan.throughput_tok_s if self.plan is not None else 0.0


@dataclass(frozen=True)
class ReplicaChoice:
    options: tuple[ReplicaOption, ...]

    @property
    def best(self) -> ReplicaOption:
        """The most node throughput; fewer replicas on a tie (within 0.1%)."""
        feasible = [o for o in self.options if o.plan is not None]
        if not feasible:
            raise SearchError("no replica count fits: " + "; ".join(f"{o.replicas_per_node}: {o.reason}"
                                                                   for o in self.options))
        top = max(o.node_tok_s for o in feasible)
        return min((o for o in feasible if o.node_tok_s >= top * 0.999), key=lambda o: o.replicas_per_node)


def choose(spec: ModelSpec, hw: HardwareProfile, workload: Workload, counts=None, **kw) -> ReplicaChoice:
    """Each replica count planned (plan_replica), those that fit priced by the node's throughput."""
    options = []
    for k in counts or candidate_counts(hw):
        try:
            options.append(ReplicaOption(k, plan_replica(spec, hw, workload, k, **kw)))
        except SearchError as e:
            options.append(ReplicaOption(k, None, str(e)))
    return ReplicaChoice(tuple(options))
