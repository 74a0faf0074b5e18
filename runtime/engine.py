"""Engine: a model (checkpoint or synthetic weights) placed per a policy, and `generate`.

    engine = Engine(plan)                        # anything with .spec and .policy
    engine = Engine(spec, policy, model_dir=DIR) # or a ModelSpec and a Policy
    tokens, measurement = engine.generate(prompts, max_new_tokens=32)

Before allocating, the engine compares what the placement needs with the free GPU memory (or the
emulated budget) and free host memory, and refuses with one line when it does not fit.
"""
from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hrm.policy import Policy, device_micro_batches
from hrm.spec import ModelSpec

from .checkpoint import load_checkpoint
from .graphs import PostAttentionGraphs
from .cpu_attention import AttentionWorker, attention_threads
from .host_memory import HostArena, pinned_bytes
from .kv_cache import KVCache, kv_elems
from .measure import Measurement, Recorder, Span, stage_times
from .model import check_supported
from .packing import MicroBatch, in_order, layout, pack
from .pipeline import Pipeline, prefill_chunks, prefill_staging_elems
from .sampling import Sampling
from .synthetic import synthesize
from .weights import WeightStore

GIB = 2**30
SWITCH_INTERVAL_S = 1e-4
"""Python's GIL switch interval while the engine generates on a GPU (default 5 ms). The main thread
holds the GIL between kernel launches and re-takes it faster than a waiting thread wakes, so the attention
worker, which needs the GIL between its kernels, can wait up to one interval each time."""
TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class DoesNotFit(MemoryError):
    """The placement needs more memory than the machine has free (one line naming the numbers)."""


class UnsupportedPolicy(ValueError):
    """A policy this runtime cannot execute."""


@dataclass(frozen=True)
class MemoryNeed:
    device_bytes: int
    host_bytes: int          # all of it page-locked when CUDA is present
    what: str


def free_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (else physical pages free)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(spec: ModelSpec, micro_batches: tuple[MicroBatch, ...], elem_bytes: int) -> int:
    """Rough device working set: the largest prefill chunk's activations, logits and MoE intermediates,
    plus per-micro-batch decode buffers."""
    chunks = [(mb, sum(mb.prefill_lens[i] for i in rows), len(rows))
              for mb in micro_batches for rows in prefill_chunks(mb)]                # prefill runs by chunk
    tokens = max(max(t for _, t, _ in chunks), max(mb.size for mb in micro_batches))   # prefill or decode
    widths = (4 * spec.hidden_size + 2 * (spec.q_dim + 2 * spec.num_key_value_heads * spec.head_dim)
              + 3 * max(spec.moe_intermediate_size, spec.shared_expert_intermediate_size))
    kv_pad = max(n * mb.prefill_len for mb, _, n in chunks) * 4 * spec.num_key_value_heads * spec.head_dim
    logits = max(n for _, _, n in chunks) * spec.vocab_size * 8
    decode = sum(mb.size for mb in micro_batches) * (2 * spec.hidden_size + 2 * spec.q_dim) * 2
    return (tokens * widths + kv_pad + decode) * elem_bytes + logits


class Engine:
    def __init__(self, plan_or_spec, policy: Policy | None = None, *, model_dir: str | Path | None = None,
                 seed: int = 0, dtype: torch.dtype | str | None = None, device: str | None = None,
                 gpu_memory_budget_bytes: int | None = None, progress: bool | None = None,
                 record: bool = True, cuda_graphs: bool = False):
        if policy is None:
            plan = plan_or_spec
            spec, policy = plan.spec, plan.policy
            self.plan_id = str(getattr(plan, "plan_id", "") or getattr(plan, "id", "") or "")
            if not self.plan_id and getattr(plan, "created", None):
                self.plan_id = _plan_id(spec, policy, plan.created)
            _check_placement(plan, policy)
        else:
            spec, self.plan_id = plan_or_spec, ""
        check_supported(spec)
        if not policy.ffn_on_gpu:
            raise UnsupportedPolicy("ffn_on_gpu=False (experts on the CPU) is not implemented by the runtime")
        self.spec, self.policy, self.record = spec, policy, record
        self.plan_id = self.plan_id or _plan_id(spec, policy)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(dtype, str) or dtype is None:
            name = dtype or spec.dtypes.name
            if name not in TORCH_DTYPES:
                raise UnsupportedPolicy(f"dtype {name!r} not supported (known: {', '.join(TORCH_DTYPES)})")
            dtype = TORCH_DTYPES[name]
        self.dtype = dtype
        self.gpu_budget_bytes = gpu_memory_budget_bytes
        if self.device.type == "cuda" and gpu_memory_budget_bytes:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_budget_bytes / total), self.device)
        self.num_resident = policy.resident_experts(spec.num_experts)
        dev_b, host_b = WeightStore.required_bytes(spec, dtype, self.num_resident)
        self.check_fits(MemoryNeed(dev_b, host_b, "weights"))
        self.store = WeightStore(spec, dtype, self.device, self.num_resident, policy.num_micro_batches)
        if model_dir is not None:
            load_checkpoint(model_dir, self.store, progress=progress)
        else:
            synthesize(self.store, seed=seed, progress=progress)
        self.graphs = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise UnsupportedPolicy("CUDA graphs need a CUDA device")
            self.graphs = PostAttentionGraphs(spec, self.store)
        self.kv = KVCache(spec, dtype, self.device)
        self.staging = HostArena(dtype, pin=self.device.type == "cuda")   # prefill hidden states between layers
        self.worker = AttentionWorker(attention_threads(self.device.type == "cuda"))
        self.last_spans: list[Span] = []

    # ---- memory ----------------------------------------------------------------------------------
    def free_device_bytes(self) -> int:
        if self.device.type != "cuda":
            return free_host_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        if self.gpu_budget_bytes:
            reserved = torch.cuda.memory_reserved(self.device)
            free = min(free + reserved, self.gpu_budget_bytes) - torch.cuda.memory_allocated(self.device)
        return free

    def check_fits(self, need: MemoryNeed) -> None:
        """Raise DoesNotFit (one line) when `need` exceeds what is free now."""
        host_free = free_host_bytes()
        if self.device.type != "cuda":
            total = need.device_bytes + need.host_bytes
            if total > host_free:
                raise DoesNotFit(f"{need.what} need {total / GIB:.2f} GiB of host memory "
                                 f"but {host_free / GIB:.2f} GiB is available")
            return
        dev_free = self.free_device_bytes()
        if need.device_bytes > dev_free:
            raise DoesNotFit(f"{need.what} need {need.device_bytes / GIB:.2f} GiB of GPU memory but "
                             f"{dev_free / GIB:.2f} GiB is free{' within the budget' if self.gpu_budget_bytes else ''}")
        if need.host_bytes > host_free:
            raise DoesNotFit(f"{need.what} need {need.host_bytes / GIB:.2f} GiB of pinned host memory "
                             f"but {host_free / GIB:.2f} GiB is available")

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, padded: bool = False) -> tuple[list[list[int]], Measurement]:
        """Generate max_new_tokens for every prompt (no early stop at EOS), in passes of batch_size."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = Sampling(temperature, top_p, seed)
        uniforms = sampling.uniforms(len(prompts), max_new_tokens)
        rec = Recorder(self.device, enabled=self.record)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
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
                                                       sampling, padded, rec)
                for r, row in tokens.items():
                    out[first + r] = row
                setup_s, prefill_s, decode_s = setup_s + s_s, prefill_s + p_s, decode_s + d_s
        finally:
            sys.setswitchinterval(interval)
        self.last_spans = rec.finish()
        passes = -(-len(prompts) // n)
        m = Measurement(
            plan_id=self.plan_id, model=self.spec.name, policy=self.policy.short(), device=self._device_name(),
            num_sequences=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
            generated_tokens=len(prompts) * max_new_tokens, decode_tokens=len(prompts) * (max_new_tokens - 1),
            prefill_s=prefill_s, decode_s=decode_s,
            decode_layer_steps=passes * self.spec.num_hidden_layers * (max_new_tokens - 1),
            stages=stage_times(self.last_spans),
            gpu_peak_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0,
            cpu_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            pinned_bytes=pinned_bytes(), setup_s=setup_s)
        return out, m

    def warm_up(self, prompts: list[list[int]], max_new_tokens: int | None = None, padded: bool = False) -> None:
        """An unmeasured pass of two micro-batches and two tokens: the first call of each kernel (cuBLAS
        handles and heuristics, the grouped-GEMM check, lazy module loads) costs far more than later ones.
        With `max_new_tokens`, the host buffers of the coming pass are then allocated (see `reserve`)."""
        self.generate(prompts[:2 * self.policy.micro_batch_size], 2, padded=padded)
        if max_new_tokens is not None:
            self.reserve(prompts, max_new_tokens, padded)

    def reserve(self, prompts: list[list[int]], max_new_tokens: int, padded: bool = False) -> None:
        """Allocate (pin and zero) the host KV cache and prefill staging of a pass over the first
        batch_size prompts now: a one-time cost like loading the weights, kept across passes, so that a
        measured pass pays only its per-pass layout (setup_s)."""
        mbs, num_dev = self._layout(prompts[:self.policy.batch_size], max_new_tokens, padded)
        self.check_fits(MemoryNeed(0, self._host_bytes_needed(mbs, num_dev), "KV cache and prefill staging"))
        self.kv.reserve(mbs, num_dev)
        self.staging.take(prefill_staging_elems(self.spec, mbs))

    def _host_bytes_needed(self, mbs, num_dev) -> int:
        """Host bytes a pass over `mbs` would allocate beyond what the KV cache and staging hold now."""
        return self.kv.host_bytes_needed(mbs, num_dev) + self.staging.extra_bytes(prefill_staging_elems(self.spec, mbs))

    def _layout(self, prompts, max_new_tokens, padded):
        """(micro-batches, number whose KV lives on the device) of one pass over `prompts`."""
        lens = [len(p) for p in prompts]
        mu = self.policy.micro_batch_size
        packing = in_order(len(prompts), mu) if padded else pack(lens, mu)
        mbs = layout(packing, lens, max_new_tokens, padded)
        return mbs, device_micro_batches(self.policy.kv_gpu_frac, len(mbs))

    def _run_pass(self, prompts, uniforms, max_new_tokens, sampling, padded, rec):
        """One pass of at most batch_size prompts: (tokens, setup, prefill and decode seconds). Setup lays out
        the pass (caches, staging, inputs) and is not part of prefill."""
        t_start = time.perf_counter()
        self.kv.release()              # the last pass's device caches, before measuring what is free
        mbs, num_dev = self._layout(prompts, max_new_tokens, padded)
        kv_dev = kv_elems(self.spec, mbs[:num_dev]) * self.dtype.itemsize
        self.check_fits(MemoryNeed(kv_dev + activation_bytes(self.spec, mbs, self.dtype.itemsize),
                                   self._host_bytes_needed(mbs, num_dev), "KV cache, prefill staging and activations"))
        self.kv.carve(mbs, num_dev)
        pipe = Pipeline(self.spec, self.policy, self.store, self.kv, mbs, num_dev, sampling, uniforms,
                        prompts, max_new_tokens, rec, self.worker, self.graphs, self.staging)
        if self.graphs is not None:
            self.graphs.capture(pipe.graph_keys())       # before the pass: capturing synchronises
        t0 = time.perf_counter()
        t_setup = t0 - t_start
        pipe.prefill()
        self._synchronize()
        t1 = time.perf_counter()
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
