"""`Plan`: the chosen policy with everything needed to run it and to check it later, as versioned JSON.

A plan file holds the model spec (every field) and the sha256 of the spec's canonical JSON, the hardware
profile (name and numbers), the workload, the policy, the per-layer placement (resident expert ids of
every MoE layer), the Estimate with its breakdown, memory per level against the budgets, the solver,
the search time, the toolkit version and the creation date. `Plan.from_json` / `Plan.load` validate
all of it and reject malformed, foreign or edited files with a one-line `PlanError`. No pickle.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from hrm.atomic import atomic_write_text
from hrm.checks import check_context, coerce, load_json, need, number, one_line, read_text, typed
from hrm.estimate import Estimate, estimate
from hrm.memory import MemoryUse
from hrm.hardware import ComputeUnit, HardwareProfile, measured_fields_renamed
from hrm.policy import Policy
from hrm.spec import ModelSpec, Workload
from .paper import PaperPrediction
from .space import Budgets

FORMAT = "moe-lightning-plan"
VERSION = 2
TOP_LEVEL_KEYS = frozenset({"format", "version", "created", "toolkit_version", "solver", "mode", "search_time_s",
                            "model", "hardware", "workload", "policy", "placement", "estimate", "memory", "budgets",
                            "paper"})


class PlanError(ValueError):
    """A plan file that cannot be used; the message is one line naming what is wrong."""


def toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("moe-lightning")
    except Exception:      # not installed (running from a checkout)
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# model spec identity

def spec_to_dict(spec: ModelSpec) -> dict:
    """Every field; an optional one at its "not used" value (plain RoPE; no sparse attention; experts stored
    as the other weights; no quantization) is left out, so its digest stays that of a spec written before
    the field existed."""
    unused = {"rope_parameters": None, "index_topk": 0, "index_n_heads": 0, "index_head_dim": 0,
              "num_linear_layers": 0, "linear_num_key_heads": 0, "linear_num_value_heads": 0,
              "linear_key_head_dim": 0, "linear_value_head_dim": 0, "linear_conv_kernel": 0,
              "linear_attention": "gated_delta", "linear_gate_rank": 0, "router_groups": 1, "router_groups_kept": 1,
              "rope_interleave": False, "softmax_scale": 0.0, "sliding_layers": (), "swiglu_limit": 0.0,
              "swiglu_alpha": 0.0, "hidden_act": "silu"}
    d = {k: v for k, v in dataclasses.asdict(spec).items() if not (k in unused and v == unused[k])}
    dt = d["dtypes"]
    if dt["expert_weight_bytes"] == dt["weight_bytes"]:
        del dt["expert_weight_bytes"]
    for optional in ("quantization", "expert_format", "kv_format"):
        if not dt[optional]:
            del dt[optional]
    return d


def spec_sha256(spec: ModelSpec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(spec_to_dict(spec), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_from_dict(d: dict) -> ModelSpec:
    return typed(ModelSpec, d, "model.spec", PlanError)


# ---------------------------------------------------------------------------------------------------
# hardware as data

def hardware_to_dict(hw: HardwareProfile) -> dict:
    def unit(u: ComputeUnit) -> dict:
        return {"name": u.name, "memory_bytes": u.memory_bytes, "mem_bytes_per_s": u.mem_bytes_per_s,
                "peak_flops": dict(u.peak_flops), "count": u.count, "cores": u.cores, "source": u.source}
    return {"name": hw.name, "description": hw.description, "path": hw.path, "gpu": unit(hw.gpu), "cpu": unit(hw.cpu),
            "link": dataclasses.asdict(hw.link),
            "measured": None if hw.measured is None else dataclasses.asdict(hw.measured),
            "memory": dataclasses.asdict(hw.memory)}


def hardware_from_dict(d: dict) -> HardwareProfile:
    """The plan's machine: every field of its type, and the rates the model divides by positive."""
    if isinstance(d, dict) and isinstance(d.get("measured"), dict):
        d = {**d, "measured": measured_fields_renamed(d["measured"])}
    hw = typed(HardwareProfile, d, "hardware", PlanError)
    for where, rate in (("gpu.memory_bytes", hw.gpu.memory_bytes), ("gpu.mem_bytes_per_s", hw.gpu.mem_bytes_per_s),
                        ("cpu.memory_bytes", hw.cpu.memory_bytes), ("cpu.mem_bytes_per_s", hw.cpu.mem_bytes_per_s),
                        ("gpu.count", hw.gpu.count), ("link.h2d_bytes_per_s", hw.link.h2d_bytes_per_s),
                        ("link.d2h_bytes_per_s", hw.link.d2h_bytes_per_s),
                        ("link.duplex_bytes_per_s", hw.link.duplex_bytes_per_s),
                        *((f"{u}.peak_flops.{k}", v) for u in ("gpu", "cpu")
                          for k, v in getattr(hw, u).peak_flops.items())):
        number(rate, f"malformed plan: hardware.{where}", err=PlanError, positive=True)
    return hw


# ---------------------------------------------------------------------------------------------------
# the plan

@dataclass(frozen=True)
class MemoryReport:
    """Peak bytes per level (from the Estimate) against the budgets the search used."""
    gpu_bytes: float
    cpu_bytes: float
    pinned_bytes: float
    gpu_budget_bytes: float
    cpu_budget_bytes: float

    @property
    def within_budgets(self) -> bool:
        return self.gpu_bytes <= self.gpu_budget_bytes and self.cpu_bytes <= self.cpu_budget_bytes


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    hardware: HardwareProfile
    workload: Workload
    policy: Policy
    moe_layers: tuple[int, ...]                    # indices of the layers with routed experts
    resident_experts: tuple[tuple[int, ...], ...]  # per MoE layer: ids of the experts kept on the GPU
    estimate: Estimate                             # our model's prediction for the policy
    memory: MemoryReport
    budgets: Budgets
    solver: str
    mode: str                                      # "default" or "paper"
    search_time_s: float
    toolkit_version: str
    created: str                                   # ISO 8601, UTC
    paper: PaperPrediction | None = None           # in paper mode

    # ---- derived -----------------------------------------------------------------------------
    @property
    def spec_sha256(self) -> str:
        return spec_sha256(self.spec)

    @property
    def throughput_tok_s(self) -> float:
        return self.estimate.throughput_tok_s

    @property
    def decode_tok_s(self) -> float:
        return self.estimate.decode_tok_s

    @property
    def bound(self) -> str:
        return self.estimate.bound

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "created": self.created, "toolkit_version": self.toolkit_version,
            "solver": self.solver, "mode": self.mode, "search_time_s": self.search_time_s,
            "model": {"spec": spec_to_dict(self.spec), "spec_sha256": self.spec_sha256},
            "hardware": hardware_to_dict(self.hardware),
            "workload": dataclasses.asdict(self.workload),
            "policy": dataclasses.asdict(self.policy),
            "placement": {"moe_layers": list(self.moe_layers),
                          "resident_experts": [list(ids) for ids in self.resident_experts]},
            "estimate": self.estimate.to_dict(),
            "memory": dataclasses.asdict(self.memory),
            "budgets": self.budgets.to_dict(),
            "paper": None if self.paper is None else self.paper.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(_plain(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def save(self, path) -> Path:
        """Write atomically: a temporary file in the same directory, then os.replace."""
        path = Path(path)
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_json(cls, text: str, *, spec: ModelSpec | None = None) -> "Plan":
        """Parse and validate; `spec`, when given, must be the model the plan was made for."""
        if not isinstance(text, str):
            raise PlanError(f"not a plan file: expected JSON text, got {type(text).__name__}")
        return cls.from_dict(load_json(text, "not a plan file", PlanError), spec=spec)

    @classmethod
    def load(cls, path, *, spec: ModelSpec | None = None) -> "Plan":
        p = Path(path)
        text = read_text(p, "plan file", PlanError)
        try:
            return cls.from_json(text, spec=spec)
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from None

    @classmethod
    def from_dict(cls, data, *, spec: ModelSpec | None = None) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError("not a plan file: the top level is not a JSON object")
        if data.get("format") != FORMAT:
            raise PlanError(f"not a plan file: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise PlanError(f"unsupported plan version {data.get('version')!r}: this toolkit reads version {VERSION}")
        unknown = sorted(set(data) - TOP_LEVEL_KEYS)
        if unknown:
            raise PlanError(f"malformed plan: unknown key(s) {', '.join(map(repr, unknown))}")
        try:
            return _from_dict(cls, data, spec)
        except PlanError:
            raise
        except KeyError as e:
            raise PlanError(f"malformed plan: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"malformed plan: {one_line(e)}") from None


def _from_dict(cls, data: dict, expected: ModelSpec | None) -> Plan:
    model = _need(data["model"], dict, "model")
    spec = spec_from_dict(model["spec"])
    digest = spec_sha256(spec)
    if model.get("spec_sha256") != digest:
        raise PlanError("model spec does not match its sha256 (the file was edited or corrupted)")
    if expected is not None and spec_sha256(expected) != digest:
        raise PlanError(f"plan was made for model {spec.name!r} (spec sha256 {digest[:12]}), "
                        f"not for {expected.name!r} (sha256 {spec_sha256(expected)[:12]})")
    hw = hardware_from_dict(data["hardware"])
    workload = typed(Workload, data["workload"], "workload", PlanError)
    check_context(spec, workload.max_prompt_len, workload.gen_len, PlanError)
    policy = typed(Policy, data["policy"], "policy", PlanError)
    placement = _need(data["placement"], dict, "placement")
    moe_layers = coerce(tuple[int, ...], placement["moe_layers"], "placement.moe_layers", PlanError)
    resident = coerce(tuple[tuple[int, ...], ...], placement["resident_experts"], "placement.resident_experts",
                       PlanError)
    _check_placement(spec, policy, moe_layers, resident)
    est = _estimate_from_dict(_need(data["estimate"], dict, "estimate"), policy, workload)
    memory = typed(MemoryReport, data["memory"], "memory", PlanError)
    budgets = typed(Budgets, data["budgets"], "budgets", PlanError)
    paper = None
    if data.get("paper") is not None:
        paper = PaperPrediction.from_dict(_need(data["paper"], dict, "paper"))
    search_time = float(data["search_time_s"])
    if not math.isfinite(search_time) or search_time < 0:
        raise PlanError(f"malformed plan: search_time_s must be a non-negative number, got {search_time}")
    return cls(spec=spec, hardware=hw, workload=workload, policy=policy, moe_layers=moe_layers,
               resident_experts=resident, estimate=est, memory=memory, budgets=budgets,
               solver=str(data["solver"]), mode=str(data["mode"]), search_time_s=search_time,
               toolkit_version=str(data["toolkit_version"]), created=str(data["created"]), paper=paper)


def _check_placement(spec: ModelSpec, policy: Policy, moe_layers, resident) -> None:
    want_layers = tuple(range(spec.first_dense_layers, spec.num_hidden_layers))
    if moe_layers != want_layers:
        raise PlanError(f"placement lists MoE layers {_short(moe_layers)}, the model has {_short(want_layers)}")
    if len(resident) != len(moe_layers):
        raise PlanError(f"placement has {len(resident)} resident-expert lists for {len(moe_layers)} MoE layers")
    e = policy.resident_experts(spec.num_experts)
    for layer, ids in zip(moe_layers, resident):
        if len(set(ids)) != len(ids) or any(not 0 <= i < spec.num_experts for i in ids):
            raise PlanError(f"placement of layer {layer}: expert ids must be distinct and in [0, {spec.num_experts})")
        if len(ids) != e:
            raise PlanError(f"placement of layer {layer} keeps {len(ids)} experts on the GPU, the policy's "
                            f"weights_gpu_frac={policy.weights_gpu_frac:g} means {e}")


def _estimate_from_dict(d: dict, policy: Policy, workload: Workload) -> Estimate:
    if typed(Policy, d["policy"], "estimate.policy", PlanError) != policy or \
            typed(Workload, d["workload"], "estimate.workload", PlanError) != workload:
        raise PlanError("the estimate was made for a different policy or workload than the plan's")
    mem = _need(d["memory_bytes"], dict, "estimate.memory_bytes")
    if not all(isinstance(mem.get(k), dict) for k in ("gpu", "pinned", "pageable")):
        raise PlanError("malformed plan: estimate.memory_bytes needs the levels gpu, pinned and pageable "
                        "(a plan written before the memory account: plan it again)")
    for level in ("gpu", "pinned", "pageable"):
        coerce(dict[str, float], mem[level], f"estimate.memory_bytes.{level}", PlanError)
    memory = MemoryUse.from_dict(mem)
    t = {k: number(d[k], f"malformed plan: estimate.{k}", err=PlanError)
         for k in ("prefill_s", "decode_s", "layer_time_s", "step_time_s", "realised_weights_gpu_frac")}
    return Estimate(model=str(d["model"]), hardware=str(d["hardware"]), policy=policy, workload=workload,
                    prefill_s=t["prefill_s"], decode_s=t["decode_s"],
                    decode_layer=_floats(d["decode_layer_s"]), prefill_layer=_floats(d["prefill_layer_s"]),
                    layer_time_s=t["layer_time_s"], step_time_s=t["step_time_s"], bound=str(d["bound"]),
                    memory=memory, realised_weights_gpu_frac=t["realised_weights_gpu_frac"])


# ---------------------------------------------------------------------------------------------------
# building a plan from a search result

def placement_of(spec: ModelSpec, policy: Policy) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """(MoE layer indices, resident expert ids per MoE layer): the first e experts of every layer, as the
    artifact and our runtime realise r_w."""
    layers = tuple(range(spec.first_dense_layers, spec.num_hidden_layers))
    e = policy.resident_experts(spec.num_experts)
    return layers, tuple(tuple(range(e)) for _ in layers)


def build_plan(problem, policy: Policy, *, budgets: Budgets, solver: str, mode: str, search_time_s: float,
               paper=None) -> Plan:
    spec, hw, wl = problem.spec, problem.hardware, problem.workload
    est = estimate(spec, hw, wl, policy, pin_all_weights=problem.pin_all_weights, use_measured=problem.use_measured)
    layers, resident = placement_of(spec, policy)
    memory = MemoryReport(gpu_bytes=float(est.memory.gpu_bytes), cpu_bytes=float(est.memory.cpu_bytes),
                          pinned_bytes=float(est.memory.pinned_bytes), gpu_budget_bytes=budgets.gpu_bytes,
                          cpu_budget_bytes=budgets.cpu_bytes)
    return Plan(spec=spec, hardware=hw, workload=wl, policy=policy, moe_layers=layers, resident_experts=resident,
                estimate=est, memory=memory, budgets=budgets, solver=solver, mode=mode,
                search_time_s=float(search_time_s), toolkit_version=toolkit_version(),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), paper=paper)


def policy_of(problem, found) -> Policy:
    return Policy.at(found.placement.placement, found.batch_size, found.micro_batch_size,
                     weights_gpu_frac=found.experts / problem.spec.num_experts, kv_gpu_frac=found.kv_gpu_frac)


def plan_from_found(problem, found, *, solver: str, mode: str, search_time_s: float) -> Plan:
    return build_plan(problem, policy_of(problem, found), budgets=problem.budgets, solver=solver, mode=mode,
                      search_time_s=search_time_s)


# ---------------------------------------------------------------------------------------------------
# helpers

def _need(value, kind, where: str):
    return need(value, kind, f"malformed plan: '{where}'", PlanError)


def _floats(d) -> dict:
    return coerce(dict[str, float], d, "estimate breakdown", PlanError)


def _plain(o):
    """JSON-ready: numpy scalars to Python numbers, tuples to lists, mappings to dicts, and NaN or
    infinity (e.g. the decode rate of a one-token generation) to null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        return _plain(o.item())
    if hasattr(o, "keys"):
        return {str(k): _plain(o[k]) for k in o.keys()}
    return o


def _short(seq) -> str:
    seq = tuple(seq)
    if len(seq) > 4 and seq == tuple(range(seq[0], seq[-1] + 1)):
        return f"{seq[0]}..{seq[-1]}"
    return str(list(seq))
