"""Paper-compatible mode: the MoE-Lightning artifact's own cost model and policy search, restated.

This is deliberately not our model (hrm.estimate): it is the small decode-only model the paper's
artifact optimises, kept so that `--search paper` reproduces the published policies. Differences from
ours: no prefill, the context fixed at s + n, attention FLOPs counting Q.K and the softmax only, no
link efficiency or duplex limit, caps of 0.86 of GPU and 0.8 of CPU memory, and the artifact's memory
terms (prefill hidden states of all N sequences held on the GPU, a 1.2x MoE kernel workspace at
prefill size).

Per layer and decode step, with nb = N / mu micro-batches:
  T      = max(ctog, T_gpu, T_cpu)                     minimised as T / N (for fixed N: T)
  ctog   = (1 - r_w) * W_layer / b_cg
  T_gpu  = nb * max(F_mlp(mu) / p_g, B_mlp(mu) / b_g)
  T_cpu  = nb * max(F_att(mu) / p_c, B_att(mu) / b_c)  (attention on the CPU: A_g = 0, F_g = 1)
  F_mlp(t) = 2 t h1 h2 3 k;  B_mlp(t) = 2 t h1 + 2 t h2 + W_layer   (every expert read per micro-batch)
  F_att(b) = 2 b (s+n) n_q d + 2 b (s+n) n_q;  B_att(b) = 2 b n_q d + 4 b (s+n) n_kv d + 2 b n_q d
  decode throughput = N n / (T (n - 1) l)
r_w (continuous) is solved as an LP with PuLP + CBC, as in the artifact; the runtime keeps int(n_e r_w)
whole experts per layer on the GPU. The LP's feasibility alone (for the micro-batch bound) is decided
in closed form, `fits`: its constraints are two half-lines in r_w. Search: mu in 1, 2, 3, 4, 36, 68, ... (steps of 32 after 4); for
each mu the largest feasible number of micro-batches by doubling then bisection; then nb = 1, 2, ...
while the throughput does not drop; the best (ties to the later) wins; stop at the first mu where not
even one micro-batch fits.

Units: the artifact's GB constant is 2**30 bytes, for memories and bandwidths alike ("15 GB" of T4
memory is 15 * 2**30 bytes). Hardware profiles store SI bytes, and the paper-compatible profiles copy
the artifact's numbers in GB, so this mode reads profile memories and bandwidths back in the artifact's
GB (bytes / 1e9 * 2**30). FLOP/s are 1e12-based in both. Sizes the user gives (`--gpu-memory 15GiB`) are
taken as given.

Ties: when the GPU term binds, T grows exactly in proportion to nb, so consecutive nb have the same
throughput in exact arithmetic; the artifact's choice between them comes from the precision of CBC's
solution values. Solving the same LP with CBC reproduces its choice (T4 summarization: 19 micro-batches,
where exact arithmetic ties 19, 20, 21, ...).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from hrm.hardware import HardwareProfile
from hrm.spec import ModelSpec, Workload
from .space import SearchError
from hrm.units import format_size, parse_size

ARTIFACT_GB = 2.0 ** 30
GPU_CAP = 0.86
CPU_CAP = 0.8
MU_DENSE = (1, 2, 3, 4)
MU_STEP = 32


def artifact_mu_grid():
    """1, 2, 3, 4, 36, 68, 100, ... (the artifact's micro-batch sizes; unbounded)."""
    yield from MU_DENSE
    mu = MU_DENSE[-1]
    while True:
        mu += MU_STEP
        yield mu


@dataclass(frozen=True)
class ArtifactMachine:
    """The artifact's hardware constants (SI), tensor parallel GPUs already multiplied in."""
    gpu_memory_bytes: float
    cpu_memory_bytes: float
    gpu_bytes_per_s: float
    cpu_bytes_per_s: float
    link_bytes_per_s: float
    gpu_flops: float
    cpu_flops: float
    tp_size: int

    @classmethod
    def from_profile(cls, hw: HardwareProfile, dtype: str, *, gpu_memory=None, cpu_memory=None) -> "ArtifactMachine":
        gib = ARTIFACT_GB / 1e9          # profile GB read back as the artifact's GB
        tp = hw.gpu.count
        g_mem = parse_size(gpu_memory) if gpu_memory is not None else hw.gpu.memory_bytes * gib
        c_mem = parse_size(cpu_memory) if cpu_memory is not None else hw.cpu.memory_bytes * gib
        return cls(gpu_memory_bytes=g_mem * tp, cpu_memory_bytes=c_mem,
                   gpu_bytes_per_s=hw.gpu.mem_bytes_per_s * gib * tp, cpu_bytes_per_s=hw.cpu.mem_bytes_per_s * gib,
                   link_bytes_per_s=hw.link.h2d_bytes_per_s * gib, gpu_flops=hw.gpu.flops_per_s(dtype) * tp,
                   cpu_flops=hw.cpu.flops_per_s(dtype), tp_size=tp)


@dataclass(frozen=True)
class PaperTerms:
    """The coefficients of one (N, mu) LP: everything but r_w is a number."""
    expert_bytes_layer: float     # W_layer: all routed experts of one layer
    gpu_s: float                  # T_gpu
    cpu_s: float                  # T_cpu
    gpu_fixed_bytes: float        # GPU bytes at r_w = 0 (the larger of the decode and prefill peaks)
    gpu_per_rw_bytes: float       # d(GPU bytes) / d r_w
    cpu_fixed_bytes: float
    cpu_per_rw_bytes: float


def paper_terms(spec: ModelSpec, m: ArtifactMachine, s: float, n: int, N: int, mu: int) -> PaperTerms:
    """Attention on the CPU and experts on the GPU (A_g = 0, F_g = 1), as in every reported setting."""
    h1, h2, l, ne, k = (spec.hidden_size, spec.moe_intermediate_size, spec.num_hidden_layers, spec.num_experts,
                        spec.num_experts_per_tok)
    nq, nkv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    wb, kb, ab = spec.dtypes.weight_bytes, spec.dtypes.kv_bytes, spec.dtypes.act_bytes
    tp, nb = m.tp_size, N // mu
    h_kv = nkv * d
    w_layer = spec.dtypes.expert_weight_bytes * 3 * h1 * h2 * ne
    w_other = wb * 2 * h1 * (nq * d + h_kv) * l      # q, o and k, v projections of every layer
    ctx = s + n

    mlp_flops = 2 * mu * h1 * h2 * 3 * k
    mlp_bytes = ab * mu * h1 + ab * mu * h2 + w_layer
    att_flops = 2 * mu * ctx * nq * d + 2 * mu * ctx * nq
    att_bytes = 2 * ab * mu * nq * d + 2 * kb * mu * ctx * h_kv
    gpu_s = nb * max(mlp_flops / m.gpu_flops, mlp_bytes / m.gpu_bytes_per_s)
    cpu_s = nb * max(att_flops / m.cpu_flops, att_bytes / m.cpu_bytes_per_s)

    kv_all = 2 * kb * ctx * h_kv * N * l             # K and V of N sequences, every layer
    decode_home = w_other + 2 * ab * h1 * N * tp     # hidden + residual of every sequence
    prefill_home = (w_other + tp * (2 * ab * h1 * mu * s + ab * h1 * N * s)   # prefill hidden states
                    + 2 * kb * s * h_kv * mu * 2)                               # KV of two micro-batches
    workspace = 1.2 * ab * (mu * k * h1 * tp * s + mu * k * 3 * h2 * s)       # fused MoE kernel at prefill
    gpu_fixed = max(decode_home, prefill_home) + 2 * w_layer + workspace
    gpu_per_rw = w_layer * l - 2 * w_layer             # resident experts in, double buffer out
    cpu_fixed = w_layer * l + kv_all + ab * h1 * N * s * tp + 2 * w_layer    # + pinned staging (2 x streamed)
    cpu_per_rw = -(w_layer * l + 2 * w_layer)
    return PaperTerms(w_layer, gpu_s, cpu_s, gpu_fixed, gpu_per_rw, cpu_fixed, cpu_per_rw)


@dataclass(frozen=True)
class PaperLP:
    """The solved LP for one (N, mu): status, per-layer time, r_w and the memory peaks."""
    feasible: bool
    layer_time_s: float = float("inf")
    weights_gpu_frac: float = 0.0
    gpu_bytes: float = 0.0
    cpu_bytes: float = 0.0
    decode_tok_s: float = 0.0
    ctog_s: float = 0.0
    gpu_s: float = 0.0
    cpu_s: float = 0.0


def solve_lp(spec: ModelSpec, m: ArtifactMachine, s: float, n: int, N: int, mu: int) -> PaperLP:
    """Minimise T / N over r_w with PuLP + CBC."""
    import pulp

    from .milp import cbc, new_var
    t = paper_terms(spec, m, s, n, N, mu)
    prob = pulp.LpProblem("artifact_policy", pulp.LpMinimize)
    T = new_var(prob, "T", 0)
    r_w = new_var(prob, "r_w", 0, 1)
    ctog = (1 - r_w) * t.expert_bytes_layer * (1 / m.link_bytes_per_s)
    prob += T * (1.0 / N)
    prob += T >= ctog
    prob += T >= t.gpu_s
    prob += T >= t.cpu_s
    gpu = t.gpu_fixed_bytes + t.gpu_per_rw_bytes * r_w
    cpu = t.cpu_fixed_bytes + t.cpu_per_rw_bytes * r_w
    prob += gpu <= GPU_CAP * m.gpu_memory_bytes
    prob += cpu <= CPU_CAP * m.cpu_memory_bytes
    status = prob.solve(cbc())
    if status != pulp.LpStatusOptimal:
        return PaperLP(False)
    T_s, rw = float(T.value()), float(r_w.value())
    return PaperLP(True, layer_time_s=T_s, weights_gpu_frac=rw, gpu_bytes=float(pulp.value(gpu)),
                   cpu_bytes=float(pulp.value(cpu)), decode_tok_s=N * n / (T_s * (n - 1) * spec.num_hidden_layers),
                   ctog_s=float(pulp.value(ctog)), gpu_s=t.gpu_s, cpu_s=t.cpu_s)


@dataclass(frozen=True)
class PaperPrediction:
    """What paper mode chose and what the artifact's model predicts for it."""
    micro_batch_size: int
    num_micro_batches: int
    batch_size: int
    weights_gpu_frac: float          # the LP's r_w (continuous)
    resident_experts: int            # int(n_e * r_w): whole experts per layer on the GPU
    layer_time_s: float              # T
    decode_tok_s: float              # N n / (T (n - 1) l)
    ctog_s: float
    gpu_s: float
    cpu_s: float
    gpu_bytes: float
    cpu_bytes: float
    gpu_cap_bytes: float             # 0.86 m_g
    cpu_cap_bytes: float             # 0.8 m_c
    lp_solves: int

    @property
    def bound(self) -> str:
        terms = {"ctog": self.ctog_s, "gpu": self.gpu_s, "cpu": self.cpu_s}
        return max(terms, key=terms.get)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaperPrediction":
        ints = ("micro_batch_size", "num_micro_batches", "batch_size", "resident_experts", "lp_solves")
        return cls(**{k: int(v) if k in ints else float(v) for k, v in d.items()})


def fits(spec: ModelSpec, m: ArtifactMachine, s: float, n: int, N: int, mu: int) -> bool:
    """The LP's feasibility in closed form: both memory constraints are half-lines in r_w in [0, 1]."""
    t = paper_terms(spec, m, s, n, N, mu)
    lo, hi = 0.0, 1.0
    for fixed, slope, cap in ((t.gpu_fixed_bytes, t.gpu_per_rw_bytes, GPU_CAP * m.gpu_memory_bytes),
                              (t.cpu_fixed_bytes, t.cpu_per_rw_bytes, CPU_CAP * m.cpu_memory_bytes)):
        if slope > 0:
            hi = min(hi, (cap - fixed) / slope)
        elif slope < 0:
            lo = max(lo, (cap - fixed) / slope)
        elif fixed > cap:
            return False
    return lo <= hi


class _Counter:
    """The LP, counting CBC solves."""

    def __init__(self, spec, machine, s, n):
        self.spec, self.machine, self.s, self.n, self.solves = spec, machine, s, n, 0

    def __call__(self, N: int, mu: int) -> PaperLP:
        self.solves += 1
        return solve_lp(self.spec, self.machine, self.s, self.n, N, mu)

    def fits(self, N: int, mu: int) -> bool:
        return fits(self.spec, self.machine, self.s, self.n, N, mu)


def _max_micro_batches(lp: _Counter, mu: int) -> int:
    """The largest feasible number of micro-batches of size mu: doubling, then bisection (0 if none)."""
    nb = 1
    while lp.fits(mu * nb, mu):
        nb *= 2
    lo, hi = max(nb // 2, 1), nb          # lo feasible (or nb == 1 infeasible), hi infeasible
    if nb == 1:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if lp.fits(mu * mid, mu):
            lo = mid
        else:
            hi = mid
    return lo


def paper_search(spec: ModelSpec, hw: HardwareProfile, workload: Workload, *, gpu_memory=None,
                 cpu_memory=None) -> PaperPrediction:
    """The artifact's search. s is the workload's prompt length (the max when padded), n its gen length."""
    machine = ArtifactMachine.from_profile(hw, spec.dtypes.name, gpu_memory=gpu_memory, cpu_memory=cpu_memory)
    s, n = workload.prompt_len, workload.gen_len
    if n < 2:
        raise SearchError(f"paper mode prices decode steps: gen_len must be at least 2, got {n}")
    lp = _Counter(spec, machine, s, n)
    best, best_tput = None, 0.0
    for mu in artifact_mu_grid():
        ub = _max_micro_batches(lp, mu)
        if ub == 0:
            break
        prev = 0.0
        for nb in range(1, ub + 1):
            r = lp(mu * nb, mu)
            if r.decode_tok_s < prev:
                break
            prev = r.decode_tok_s
            if r.decode_tok_s >= best_tput:
                best, best_tput = (mu, nb, r), r.decode_tok_s
    if best is None:
        t = paper_terms(spec, machine, s, n, 1, 1)
        need = t.gpu_fixed_bytes + min(t.gpu_per_rw_bytes, 0.0)
        raise SearchError(f"paper mode: not even one sequence fits the artifact's caps (GPU needs "
                          f"{format_size(need)} of {format_size(GPU_CAP * machine.gpu_memory_bytes)}, CPU "
                          f"{format_size(t.cpu_fixed_bytes + t.cpu_per_rw_bytes)}-{format_size(t.cpu_fixed_bytes)}"
                          f" of {format_size(CPU_CAP * machine.cpu_memory_bytes)})")
    mu, nb, r = best
    return PaperPrediction(micro_batch_size=mu, num_micro_batches=nb, batch_size=mu * nb,
                           weights_gpu_frac=r.weights_gpu_frac,
                           resident_experts=int(spec.num_experts * r.weights_gpu_frac),
                           layer_time_s=r.layer_time_s, decode_tok_s=r.decode_tok_s, ctog_s=r.ctog_s, gpu_s=r.gpu_s,
                           cpu_s=r.cpu_s, gpu_bytes=r.gpu_bytes, cpu_bytes=r.cpu_bytes,
                           gpu_cap_bytes=GPU_CAP * machine.gpu_memory_bytes,
                           cpu_cap_bytes=CPU_CAP * machine.cpu_memory_bytes, lp_solves=lp.solves)
