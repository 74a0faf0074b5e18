"""Engine: a model (checkpoint or synthetic weights) placed per a policy, and `generate`.

    engine = Engine(plan)                        # anything with .spec and .policy
    engine = Engine(spec, policy, model_dir=DIR) # or a ModelSpec and a Policy
    tokens, measurement = engine.generate(prompts, max_new_tokens=32)

Before allocating, the engine compares what the placement needs with the free GPU memory (or the
emulated budget) and free host memory, and refuses with one line when it does not fit.
"""
from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from hrm.checks import check_context
from hrm.memory import PassShape
from hrm.policy import Policy, device_micro_batches, realised_kv_frac
from hrm.spec import ModelSpec, Workload

from . import parallel
from .checkpoint import load_checkpoint
from .graphs import PostAttentionGraphs
from .cpu_attention import AttentionWorker, attention_threads
from .host_memory import HostArena, pinned_bytes
from .kv_cache import KVCache
from .mla import LatentKVCache
from .measure import Measurement, Recorder, Span, allocator_conf, configure_allocator, stage_times
from .memory import DoesNotFit  # noqa: F401  (raised from here; callers import it from the engine)
from .memory import Machine, MemoryMeter, check, pass_shape, phase_dicts, policy_account
from .model import check_supported
from .packing import in_order, layout, pack
from .pipeline import Pipeline
from .prefill import prefill_chunks
from .sampling import Sampling
from .synthetic import synthesize
from .weights import WeightStore

SWITCH_INTERVAL_S = 1e-4
"""Python's GIL switch interval while the engine generates on a GPU (default 5 ms). The main thread
holds the GIL between kernel launches and re-takes it faster than a waiting thread wakes, so the attention
worker, which needs the GIL between its kernels, can wait up to one interval each time."""
TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class UnsupportedPolicy(ValueError):
    """A policy this runtime cannot execute."""


def check_gpus(hardware, ranks: int = 1, what: str = "the plan's hardware") -> None:
    """A plan for G GPUs runs on G tensor-parallel ranks (torchrun --nproc-per-node G), one GPU each: a plan
    of several GPUs, whose budget is theirs together, is refused on fewer ranks, not run on one."""
    if hardware is None:                     # a model and a policy: no machine to hold the ranks to
        return
    if hardware.gpu.count != ranks:
        count = hardware.gpu.count
        how = "run it under torchrun --nproc-per-node " + str(count) if count > 1 else "run it without torchrun"
        raise UnsupportedPolicy(f"{what} {hardware.name!r} has {count} GPU{'s' * (count > 1)}, this run "
                                f"{ranks} rank{'s' * (ranks > 1)} (one GPU each): {how}, or plan for {ranks}")


WARM_UP_MICRO_BATCH = 256
"""The warm-up pass runs two micro-batches of at most this many sequences: every kernel and MoE path of
the real pass (prefill chunks, decode micro-batches above MOE_DENSE_MAX_TOKENS), at a fraction of its time."""


class Engine:
    def __init__(self, plan_or_spec, policy: Policy | None = None, *, model_dir: str | Path | None = None,
                 seed: int = 0, dtype: torch.dtype | str | None = None, device: str | None = None,
                 gpu_memory_budget_bytes: int | None = None, progress: bool | None = None,
                 record: bool = True, cuda_graphs: bool = False, machine: Machine | None = None,
                 tensor_parallel: parallel.TensorParallel | None = None):
        """tensor_parallel: this process is one rank of that group (runtime.parallel): it holds, loads and
        runs its shard of the model; the plan's GPU budget is the ranks' together."""
        tp = tensor_parallel if tensor_parallel is not None and tensor_parallel.world > 1 else None
        ranks = tp.world if tp else 1
        from_plan = policy is None
        if from_plan:
            plan = plan_or_spec
            spec, policy = plan.spec, plan.policy
            self.plan_id = str(getattr(plan, "plan_id", "") or getattr(plan, "id", "") or "")
            if not self.plan_id and getattr(plan, "created", None):
                self.plan_id = _plan_id(spec, policy, plan.created)
            _check_placement(plan, policy)
            check_gpus(getattr(plan, "hardware", None), ranks)
        else:
            spec, self.plan_id = plan_or_spec, ""
        check_supported(spec)
        self.shard = parallel.Shard(spec, tp.rank, tp.world) if tp else None
        if tp:
            spec = self.shard.spec
            if cuda_graphs:
                raise UnsupportedPolicy("CUDA graphs with tensor parallelism (the all-reduces are not captured)")
            if gpu_memory_budget_bytes:
                gpu_memory_budget_bytes //= tp.world
        if not policy.ffn_on_gpu:
            raise UnsupportedPolicy("ffn_on_gpu=False (experts on the CPU) is not implemented by the runtime")
        if spec.dtypes.kv_format and (policy.attention_on_gpu or policy.kv_gpu_frac):
            raise UnsupportedPolicy(f"a {spec.dtypes.kv_format} KV cache is read by the CPU attention on the host "
                                    "only (not with GPU attention or KV on the GPU)")
        self.spec, self.policy, self.record = spec, policy, record
        self.plan_id = self.plan_id or _plan_id(spec, policy)
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', tp.rank))}" if tp else "cuda"
        self.device = torch.device(device or (local if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(dtype, str) or dtype is None:
            name = dtype or spec.dtypes.name
            if name not in TORCH_DTYPES:
                raise UnsupportedPolicy(f"dtype {name!r} not supported (known: {', '.join(TORCH_DTYPES)})")
            dtype = TORCH_DTYPES[name]
        self.dtype = dtype
        self.gpu_budget_bytes = gpu_memory_budget_bytes
        if self.device.type == "cuda":
            configure_allocator()
        hw = getattr(plan_or_spec, "hardware", None) if from_plan else None
        self.machine = machine or Machine.measure(self.device, gpu_memory_budget_bytes,
                                                  hw.memory if hw is not None else None)
        if self.device.type == "cuda" and gpu_memory_budget_bytes:
            # the budget is the process's total: the allocator gets what the CUDA context leaves of it
            total = torch.cuda.get_device_properties(self.device).total_memory
            room = gpu_memory_budget_bytes - self.machine.profile.cuda_context_bytes
            torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, room / total)), self.device)
        self.meter = MemoryMeter(self.device, self.machine.profile.cuda_context_bytes)
        self.meter.phase("load")
        self.num_resident = policy.resident_experts(spec.num_experts)
        # the whole account before the first large allocation: the plan's own pass, else the weights with
        # one sequence
        workload = getattr(plan_or_spec, "workload", None) if from_plan else None
        shape = (PassShape.nominal(workload, policy.batch_size, policy.micro_batch_size,
                                   float(realised_kv_frac(policy.kv_gpu_frac, policy.num_micro_batches)))
                 if workload is not None else PassShape.nominal(Workload.uniform(1, 1), 1, 1, 0.0))
        check(self.account(shape), self.machine, "the plan" if workload is not None else "the weights")
        self.store = WeightStore(spec, dtype, self.device, self.num_resident, policy.num_micro_batches)
        if model_dir is not None:
            load_checkpoint(model_dir, self.store, progress=progress, shard=self.shard)
        else:
            synthesize(self.store, seed=seed, progress=progress, shard=self.shard)
        parallel.activate(tp)
        self.graphs = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise UnsupportedPolicy("CUDA graphs need a CUDA device")
            self.graphs = PostAttentionGraphs(spec, self.store)
        self.kv = (LatentKVCache if spec.attention == "mla" else KVCache)(spec, dtype, self.device)
        pin = self.device.type == "cuda"
        self.staging = HostArena(dtype, pin=pin)        # prefill hidden states between layers
        self.kv_transfer = HostArena(torch.uint8 if self.kv.format else dtype, pin=pin)  # prefill KV to the host cache
        self.worker = AttentionWorker(attention_threads(self.device.type == "cuda", ranks))
        self.last_spans: list[Span] = []
        self.last_account = None                        # hrm.memory.MemoryUse of the last pass as laid out
        self._pipe: Pipeline | None = None
        self.meter.end()
        self.setup_memory = self.meter.take()

    def account(self, shape: PassShape):
        """The memory account of a pass of this shape in the engine's dtype, with this process's measured
        CUDA context and baseline."""
        name = str(self.dtype).removeprefix("torch.")
        b, dt = float(self.dtype.itemsize), self.spec.dtypes
        expert_b = dt.expert_weight_bytes if dt.expert_format else b     # quantized experts keep their bytes
        kv_b = dt.kv_bytes if dt.kv_format else b                         # ... and a scaled KV cache
        spec = (self.spec if name == dt.name
                else replace(self.spec, dtypes=replace(dt, weight_bytes=b, kv_bytes=kv_b, act_bytes=b, name=name,
                                                       expert_weight_bytes=expert_b)))
        return policy_account(spec, self.policy, shape, self.machine.profile)

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, padded: bool = False,
                 stop_token_ids=()) -> tuple[list[list[int]], Measurement]:
        """Generate up to max_new_tokens for every prompt, in passes of batch_size. With `stop_token_ids`, a
        pass ends once each of its sequences has sampled one of them (checked two steps behind, so its rows
        may run a step or two past the last stop token); a row's tokens after its own stop token are the
        caller's to drop. Every row of a pass has the same length."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_context(self.spec, max(len(p) for p in prompts), max_new_tokens)
        low, high = min(min(p) for p in prompts), max(max(p) for p in prompts)
        if low < 0 or high >= self.spec.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} outside the vocabulary [0, {self.spec.vocab_size})")
        sampling = Sampling(temperature, top_p, seed)
        uniforms = sampling.uniforms(len(prompts), max_new_tokens)
        rec = Recorder(self.device, enabled=self.record)
        rec.start()
        out: list[list[int]] = [[] for _ in prompts]
        setup_s = prefill_s = decode_s = 0.0
        n = self.policy.batch_size
        interval = sys.getswitchinterval()
        if self.device.type == "cuda":
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            for first in range(0, len(prompts), n):
                batch = prompts[first:first + n]
                tokens, s_s, p_s, d_s = self._run_pass(batch, uniforms[first:first + n], max_new_tokens,
                                                       sampling, padded, rec, stop_token_ids)
                for r, row in tokens.items():
                    out[first + r] = row
                setup_s, prefill_s, decode_s = setup_s + s_s, prefill_s + p_s, decode_s + d_s
        finally:
            sys.setswitchinterval(interval)
            self.meter.end()
        self.last_spans = rec.finish()
        phases = self.setup_memory + self.meter.take()
        m = Measurement(
            plan_id=self.plan_id, model=self.spec.name, policy=self.policy.short(), device=self._device_name(),
            num_sequences=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
            generated_tokens=sum(map(len, out)), decode_tokens=sum(len(row) - 1 for row in out),
            prefill_s=prefill_s, decode_s=decode_s,
            decode_layer_steps=self.spec.num_hidden_layers * sum(len(out[f]) - 1 for f in range(0, len(prompts), n)),
            stages=stage_times(self.last_spans),
            gpu_peak_bytes=max(p.gpu_process_peak_bytes for p in phases),
            cpu_peak_bytes=max([p.host_rss_peak_bytes for p in phases]
                               + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 * (not phases)]),
            pinned_bytes=pinned_bytes(), setup_s=setup_s, memory_phases=tuple(phase_dicts(phases)),
            account_bytes=self.last_account.to_dict() if self.last_account is not None else None,
            allocated_bytes=self.allocated_bytes(), allocator=allocator_conf())
        return out, m

    def warm_up(self, prompts: list[list[int]], max_new_tokens: int | None = None, padded: bool = False) -> None:
        """An unmeasured pass of two micro-batches (of at most WARM_UP_MICRO_BATCH sequences) and two
        tokens: the first call of each kernel (cuBLAS handles and heuristics, the grouped-GEMM check, lazy
        module loads) costs far more than later ones. With `max_new_tokens`, the host buffers of the coming
        pass are allocated first (see `reserve`), so the warm-up's smaller pass reuses them."""
        if max_new_tokens is not None:
            self.reserve(prompts, max_new_tokens, padded)
        self.generate(prompts[:2 * min(self.policy.micro_batch_size, WARM_UP_MICRO_BATCH)], 2, padded=padded)

    def reserve(self, prompts: list[list[int]], max_new_tokens: int, padded: bool = False) -> None:
        """Allocate (pin and zero) the host buffers of a pass over the first batch_size prompts now (KV
        cache, prefill staging, KV transfer): a one-time cost like loading the weights, kept across passes,
        so that a measured pass pays only its per-pass layout (setup_s). Measured as the "reserve" phase."""
        self.meter.phase("reserve")
        mbs, num_dev = self._layout(prompts[:self.policy.batch_size], max_new_tokens, padded)
        acc = self._pass_account(mbs, num_dev, max_new_tokens)
        check(self._held(acc), self.machine, "the pass's KV cache and buffers")
        self._host_buffers(acc)
        self.meter.end()
        self.setup_memory = self.setup_memory + self.meter.take()

    def _pass_account(self, mbs, num_dev: int, max_new_tokens: int):
        return self.account(pass_shape(mbs, num_dev, [prefill_chunks(mb) for mb in mbs], max_new_tokens))

    def _held(self, acc):
        """The account with the host buffers as large as the arenas already hold (an arena keeps the
        largest pass's size): what the process holds during the pass."""
        held = {"kv_cache": self.kv.host_bytes, "prefill_staging": self.staging.nbytes,
                "kv_transfer": self.kv_transfer.nbytes}
        return replace(acc, pinned={k: max(v, held.get(k, 0.0)) for k, v in acc.pinned.items()})

    def _host_buffers(self, acc) -> None:
        """The pass's host buffers at the account's sizes (an arena grows only when a pass needs more)."""
        elem = self.dtype.itemsize
        self.kv.release()              # the last pass's views and device caches, before any buffer moves
        self.kv.reserve_bytes(acc.pinned["kv_cache"])
        self.staging.take(int(acc.pinned["prefill_staging"]) // elem)
        self.kv_transfer.take(round(acc.pinned["kv_transfer"]) // self.kv_transfer.dtype.itemsize)

    def allocated_bytes(self) -> dict:
        """Bytes the runtime holds now, by the account's parts (level -> part -> bytes), from its tensors."""
        pipe = self._pipe
        gpu = {**self.store.allocated_bytes(), "kv_cache": self.kv.device_bytes}
        pinned = {"offloaded_experts": self.store.offloaded_bytes, "kv_cache": self.kv.host_bytes,
                  "prefill_staging": self.staging.nbytes, "kv_transfer": self.kv_transfer.nbytes}
        pageable = {}
        if pipe is not None:
            state = pipe.allocated_bytes()
            gpu.update(pass_state=state["gpu_pass_state"], prefill_inputs=state["prefill_inputs"],
                       kv_stream_buffer=state["kv_stream_buffer"])
            pinned["io_buffers"] = state["io_buffers"]
            pageable["pass_state"] = state["host_pass_state"]
        return {"gpu": gpu, "pinned": pinned, "pageable": pageable}

    def _layout(self, prompts, max_new_tokens, padded):
        """(micro-batches, number whose KV lives on the device) of one pass over `prompts`."""
        lens = [len(p) for p in prompts]
        mu = self.policy.micro_batch_size
        packing = in_order(len(prompts), mu) if padded else pack(lens, mu)
        mbs = layout(packing, lens, max_new_tokens, padded)
        return mbs, device_micro_batches(self.policy.kv_gpu_frac, len(mbs))

    def _run_pass(self, prompts, uniforms, max_new_tokens, sampling, padded, rec, stop_token_ids=()):
        """One pass of at most batch_size prompts: (tokens, setup, prefill and decode seconds). Setup lays out
        the pass (caches, staging, inputs) and is not part of prefill. The pass's account is checked
        against what this process may hold before anything of it is allocated."""
        t_start = time.perf_counter()
        self.meter.phase("prefill")
        self._pipe = None
        self.kv.release()              # the last pass's device caches, before measuring what is free
        mbs, num_dev = self._layout(prompts, max_new_tokens, padded)
        acc = self._pass_account(mbs, num_dev, max_new_tokens)
        self.last_account = self._held(acc)
        check(self.last_account, self.machine, "the pass")
        self._host_buffers(acc)
        self.kv.carve(mbs, num_dev)
        pipe = Pipeline(self.spec, self.policy, self.store, self.kv, mbs, num_dev, sampling, uniforms,
                        prompts, max_new_tokens, rec, self.worker, self.graphs, self.staging, self.kv_transfer,
                        stop_token_ids)
        self._pipe = pipe
        if self.graphs is not None:
            self.graphs.capture(pipe.graph_keys())       # before the pass: capturing synchronises
        t0 = time.perf_counter()
        t_setup = t0 - t_start
        pipe.prefill()
        self._synchronize()
        t1 = time.perf_counter()
        self.meter.phase("decode")
        pipe.decode()
        tokens = pipe.tokens()
        t2 = time.perf_counter()
        return tokens, t_setup, t1 - t0, t2 - t1

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def close(self) -> None:
        self.worker.close()
        if self.shard is not None:
            parallel.activate(None)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plan_id(spec: ModelSpec, policy: Policy, created: str = "") -> str:
    return hashlib.sha1(f"{spec.name}|{policy!r}|{created}".encode()).hexdigest()[:12]


def _check_placement(plan, policy: Policy) -> None:
    """The runtime keeps experts 0..r-1 of every layer on the GPU; refuse a plan that places others."""
    resident = getattr(plan, "resident_experts", None)
    if resident is None:
        return
    r = policy.resident_experts(plan.spec.num_experts)
    odd = [i for i, ids in enumerate(resident) if tuple(ids) != tuple(range(r))]
    if odd:
        raise UnsupportedPolicy(f"plan keeps other experts than 0..{r - 1} resident in MoE layer(s) "
                                f"{odd[:5]}: the runtime keeps the first {r} of every layer")
