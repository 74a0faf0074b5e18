"""`LLM`: the offline batch job in the style of vLLM's `LLM(model).generate(prompts)`.

    from moe_lightning import LLM, SamplingParams
    with LLM("path/to/model-dir") as llm:                  # or a Hub id in the local HF cache
        for c in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
            print(c.id, c.finish_reason, c.text)

Text goes through the model directory's tokenizer; the runtime's Engine executes a plan: the one given,
else one searched for this machine and this job's prompt lengths. Requests are run in engine passes of
the plan's batch size, each pass sharing one (temperature, top_p, max_tokens); end-of-sequence tokens and
stop strings end a sequence (the engine computes max_tokens for every sequence of a pass, the text is cut
afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .requests import Completion, Request, RequestError, SamplingParams
from .text import TextCodec


@dataclass(frozen=True)
class Batch:
    index: int                      # position in the job's schedule; seeds the pass's sampling
    rows: tuple[int, ...]           # indices of the job's requests
    params: SamplingParams          # temperature, top_p and max_tokens shared by the rows


def schedule(requests: Sequence[Request], batch_size: int) -> list[Batch]:
    """Engine passes: requests grouped by (temperature, top_p, max_tokens), in input order within a
    group, cut into passes of batch_size. Depends only on the whole job, so a resumed job runs the
    passes it had left exactly as the first run would have."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((*r.params.sampling_key, r.params.max_tokens), []).append(i)
    out = []
    for rows in groups.values():
        for first in range(0, len(rows), batch_size):
            chunk = tuple(rows[first:first + batch_size])
            out.append(Batch(len(out), chunk, requests[chunk[0]].params))
    return out


def pass_seconds(spec, hardware, policy, prompt_lens: Sequence[int], max_tokens: int) -> float:
    """The model's prediction for one engine pass (hrm.estimate at the pass's own size and prompt lengths)."""
    from hrm.estimate import estimate
    from hrm.spec import Workload
    n = len(prompt_lens)
    policy = policy.for_batch(n)
    return estimate(spec, hardware, Workload.from_prompt_lens(prompt_lens, max_tokens), policy).total_s


@dataclass(frozen=True)
class JobPrediction:
    """How long a whole job takes under a policy: its passes, each priced at its own size."""
    num_requests: int
    passes: int
    generated_tokens: int          # max_tokens of every request (the runtime does not stop early)
    seconds: float

    def to_dict(self) -> dict:
        return {"num_requests": self.num_requests, "passes": self.passes,
                "generated_tokens": self.generated_tokens, "seconds": self.seconds}


def predict_job(spec, hardware, policy, requests: Sequence[Request], prompt_lens: Sequence[int]) -> JobPrediction:
    batches = schedule(requests, policy.batch_size)
    seconds = sum(pass_seconds(spec, hardware, policy, [prompt_lens[i] for i in b.rows], b.params.max_tokens)
                  for b in batches)
    return JobPrediction(len(requests), len(batches), sum(r.params.max_tokens for r in requests), seconds)


def machine_profile(hardware: str | None):
    """(HardwareProfile, how it was chosen): the one named, else the built-in profile of this machine's
    GPU (a measured one first), else on a machine without CUDA the default profile."""
    import torch

    from hrm.hardware import load_profile

    from .machine import MachineError, auto_profile, detect
    if hardware:
        return load_profile(hardware), "given"
    if not torch.cuda.is_available():
        from moe_lightning_cli.common import DEFAULT_HARDWARE
        return load_profile(DEFAULT_HARDWARE), f"no CUDA GPU: the runtime runs on the CPU; planned on {DEFAULT_HARDWARE}"
    m = detect()
    try:
        hw, how = auto_profile(m)
    except MachineError:
        raise RequestError(f"no built-in hardware profile for this GPU ({m.gpu_name}); pass --hardware NAME|FILE "
                           "(`moe-lightning profile` measures this machine)") from None
    return hw, how


class LLM:
    def __init__(self, model: str | Path, *, plan=None, hardware: str | None = None, gpu_memory=None,
                 cpu_memory=None, batch_size: int | None = None, dtype: str | None = None, seed: int = 0,
                 download: bool = False, progress: bool = True, expert_dtype: str | None = None,
                 kv_dtype: str | None = None):
        from hrm.hf_config import load_model

        from .hub import resolve_model
        path = Path(resolve_model(str(model), download=download, weights=True))
        if not path.is_dir():
            from hrm.hf_config import builtin_models
            why = ("a built-in name has no weights" if str(model).lower() in builtin_models() else
                   "not a directory" if path.exists() else "no such directory")
            raise RequestError(f"model {str(model)!r}: generation needs a checkpoint directory or a Hub id ({why})")
        self.model_dir = path
        self.spec = load_model(path)
        if expert_dtype is not None:                # routed experts quantized at load (hrm.formats)
            self.spec = self.spec.with_expert_format(expert_dtype)
        if kv_dtype is not None:                    # the KV cache's format (hrm.formats: int8, fp8 with scales)
            self.spec = self.spec.with_kv_format(kv_dtype)
        self.codec = TextCodec.from_model_dir(path)
        if isinstance(plan, (str, Path)):
            from optimizer.plan import Plan
            plan = Plan.load(plan, spec=self.spec)
        if batch_size is not None and batch_size < 1:
            raise RequestError(f"batch_size must be >= 1, got {batch_size}")
        self.plan, self.plan_source = plan, "given" if plan is not None else None
        self.hardware, self.gpu_memory, self.cpu_memory = hardware, gpu_memory, cpu_memory
        self.batch_size, self.dtype, self.seed, self.progress = batch_size, dtype, seed, progress
        self._engine = None

    # ---- the job ---------------------------------------------------------------------------------
    def encode(self, requests: Sequence[Request]) -> list[list[int]]:
        """Every request's prompt tokens, checked against the model's context and vocabulary."""
        out = []
        for r in requests:
            ids = self.codec.encode(r)
            if len(ids) + r.params.max_tokens > self.spec.max_position_embeddings:
                raise RequestError(f"request {r.id!r}: prompt {len(ids)} + max_tokens {r.params.max_tokens} tokens "
                                   f"exceed the model's max_position_embeddings {self.spec.max_position_embeddings}")
            if max(ids) >= self.spec.vocab_size:
                raise RequestError(f"request {r.id!r}: token id {max(ids)} outside the model's vocabulary "
                                   f"({self.spec.vocab_size}); is the tokenizer the model's?")
            out.append(ids)
        return out

    def plan_for(self, requests: Sequence[Request], prompt_ids: Sequence[list[int]]):
        """The plan the job runs: the given one, else searched for this machine, the prompts' lengths and
        the longest max_tokens (kept for later calls)."""
        if self.plan is None:
            from hrm.spec import Workload
            from optimizer.search import search
            hw, how = machine_profile(self.hardware)
            workload = Workload.from_prompt_lens([len(p) for p in prompt_ids],
                                                 max(r.params.max_tokens for r in requests))
            self.plan = search(self.spec, hw, workload, gpu_memory=self.gpu_memory, cpu_memory=self.cpu_memory)
            self.plan_source = how
        return self.plan

    @property
    def policy(self):
        """The plan's policy, its batch capped at batch_size."""
        p = self.plan.policy
        if self.batch_size is None or self.batch_size >= p.batch_size:
            return p
        return p.for_batch(self.batch_size)

    def predicted_s(self, batch: Batch, prompt_ids: Sequence[list[int]]) -> float:
        return pass_seconds(self.spec, self.plan.hardware, self.policy, [len(prompt_ids[i]) for i in batch.rows],
                            batch.params.max_tokens)

    def engine(self):
        if self._engine is None:
            import torch

            from runtime.engine import Engine, UnsupportedPolicy
            if self.plan.hardware.gpu.count > 1:
                raise UnsupportedPolicy(f"the plan's hardware {self.plan.hardware.name!r} has {self.plan.hardware.gpu.count} "
                                        "GPUs: generate runs on one GPU (tensor-parallel plans run with `run` under "
                                        "torchrun); plan for one GPU")
            plan = replace(self.plan, policy=self.policy)
            budget = int(plan.budgets.gpu_total_bytes) if torch.cuda.is_available() else None
            self._engine = Engine(plan, model_dir=self.model_dir, dtype=self.dtype, seed=self.seed,
                                  gpu_memory_budget_bytes=budget, progress=self.progress)
        return self._engine

    def run(self, requests: Sequence[Request], *, skip: Iterable[str] = (),
            on_batch: Callable[[list[Completion]], None] | None = None,
            on_start: Callable[[list[Batch], list[float]], None] | None = None) -> dict[str, Completion]:
        """Run the requests whose ids are not in `skip`; call on_batch with each pass's completions as it
        finishes (on_start first, with the passes left and their predicted seconds)."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise RequestError("request ids must be unique")
        prompt_ids = self.encode(requests)
        self.plan_for(requests, prompt_ids)
        batches = self.passes(requests, skip)
        if on_start is not None:
            on_start(batches, [self.predicted_s(b, prompt_ids) for b in batches])
        out: dict[str, Completion] = {}
        for b in batches:
            done = self.run_pass(b, requests, prompt_ids)
            if on_batch is not None:
                on_batch(done)
            out.update((c.id, c) for c in done)
        return out

    def passes(self, requests: Sequence[Request], skip: Iterable[str] = ()) -> list[Batch]:
        """The job's engine passes under the plan (plan_for first), less the rows whose ids are in `skip`;
        each keeps its index in the whole job's schedule, which seeds its sampling."""
        ids, skip = [r.id for r in requests], set(skip)
        batches = [b for b in schedule(requests, self.policy.batch_size) if any(ids[i] not in skip for i in b.rows)]
        return [replace(b, rows=tuple(i for i in b.rows if ids[i] not in skip)) for b in batches]

    def run_pass(self, b: Batch, requests: Sequence[Request], prompt_ids: Sequence[list[int]]) -> list[Completion]:
        """One engine pass over the batch's rows of `requests` (the engine may cut it into passes of its own
        N; the sample of a row depends only on the pass's index and the row's place in it)."""
        p = b.params
        tokens, _ = self.engine().generate([prompt_ids[i] for i in b.rows], p.max_tokens,
                                           temperature=p.temperature, top_p=p.top_p,
                                           seed=self.seed * 1_000_003 + b.index, stop_token_ids=self.codec.eos_ids)
        return [self.codec.finish(requests[i], len(prompt_ids[i]), t) for i, t in zip(b.rows, tokens)]

    # ---- vLLM-style entry points ------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Completions of text prompts (a string, or a list of strings or Requests), in order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        reqs = [p if isinstance(p, Request) else Request(str(i), prompt=p, params=_params(params, i))
                for i, p in enumerate(prompts)]
        done = self.run(reqs)
        return [done[r.id] for r in reqs]

    def chat(self, conversations, params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Completions of conversations (lists of {"role", "content"} messages) through the chat template."""
        conversations = list(conversations)
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        reqs = [Request(str(i), messages=tuple(c), params=_params(params, i)) for i, c in enumerate(conversations)]
        done = self.run(reqs)
        return [done[r.id] for r in reqs]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _params(params, i: int) -> SamplingParams:
    if params is None:
        return SamplingParams()
    return params if isinstance(params, SamplingParams) else params[i]
