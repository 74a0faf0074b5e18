"""`generate --replicas K`: K engine replicas as Ray actors over a Ray Data dataset of the prompts.

    driver: requests -> the job's engine passes (the schedule one replica would run) -> a dataset of the
            prompts, one block per pass -> map_batches(Replica, actor pool of K) -> completions by row
            -> one JSONL in input order, written once, after every row came back
    Replica: its own plan (optimizer.replicas: its share of its node) and its own Engine; one pass a batch

A pass's samples depend only on its index in the job's schedule and each row's place in it, so any replica
running it, once or again after a failure, gives what one replica would. Ray restarts a replica whose
process died and retries the pass it held (Ray Data's actor pool); the driver checks every row came back
exactly once. Ray is optional (`pip install 'moe-lightning[ray]'`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

from .requests import Completion, Request, RequestError

FAULT_ENV = "MOE_LIGHTNING_RAY_FAULT_ONCE"
"""Test hook: a file path. The first replica to finish a pass while the file does not exist creates it and
exits at once (os._exit), its pass's results lost: one replica dies mid-job, once."""


def import_ray():
    """ray and ray.data, or one line saying how to install them."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pyarrow and pandas)
    except ImportError as e:
        raise RequestError(f"--replicas and --ray-address need Ray, which is not installed ({e.name or e}): "
                           "pip install 'moe-lightning[ray]'") from None
    return ray


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica needs to build its engine (pickled to the actors)."""
    model: str
    plan: object | None               # a given optimizer.plan.Plan, else each replica plans its own
    workload: object                  # hrm.spec.Workload of the whole job (what a replica plans for)
    replicas_per_node: int
    hardware: str | None = None
    gpu_memory: float | None = None
    cpu_memory: float | None = None
    batch_size: int | None = None
    dtype: str | None = None
    seed: int = 0
    expert_dtype: str | None = None
    kv_dtype: str | None = None
    download: bool = False
    fault_file: str | None = None


class Replica:
    """One engine replica (a Ray Data actor): a batch is one engine pass of the job's schedule."""

    def __init__(self, config: ReplicaConfig):
        from .llm import LLM
        self.config = config
        self.llm = LLM(config.model, plan=config.plan, hardware=config.hardware, gpu_memory=config.gpu_memory,
                       cpu_memory=config.cpu_memory, batch_size=config.batch_size, dtype=config.dtype,
                       seed=config.seed, download=config.download, progress=False, expert_dtype=config.expert_dtype,
                       kv_dtype=config.kv_dtype)
        if config.plan is None:
            self.llm.plan, self.llm.plan_source = self._own_plan()
        self.name = f"{_node_id()[:8]}:{os.getpid()}"

    def _own_plan(self):
        from optimizer.replicas import plan_replica

        from .llm import machine_profile
        c = self.config
        hw, how = machine_profile(c.hardware)
        plan = plan_replica(self.llm.spec, hw, c.workload, c.replicas_per_node, gpu_memory=c.gpu_memory,
                            cpu_memory=c.cpu_memory)
        return plan, f"{how}; 1 of {c.replicas_per_node} replicas on its node"

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .llm import Batch
        passes = sorted(set(int(p) for p in batch["pass"]))
        size = int(batch["pass_size"][0])
        if len(passes) != 1 or len(batch["row"]) != size:
            raise RuntimeError(f"a replica got rows of passes {passes} ({len(batch['row'])} rows), not one whole "
                               f"pass of {size}")
        order = np.argsort(batch["position"])
        requests = [_request_from_json(batch["request"][i]) for i in order]
        prompt_ids = [[int(t) for t in batch["prompt_ids"][i]] for i in order]
        b = Batch(passes[0], tuple(range(len(requests))), requests[0].params)
        done = self.llm.run_pass(b, requests, prompt_ids)
        self._maybe_fail()
        return {"row": np.asarray([int(batch["row"][i]) for i in order]),
                "completion": np.asarray([c.to_json() for c in done], dtype=object),
                "replica": np.asarray([self.name] * len(done), dtype=object),
                "policy": np.asarray([self.llm.policy.short()] * len(done), dtype=object)}

    def _maybe_fail(self) -> None:
        path = self.config.fault_file
        if path:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:          # noqa: BLE001: outside Ray (a replica built in-process)
        return "local"


def _request_to_json(r: Request) -> str:
    p = r.params
    d = {"id": r.id, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "stop": list(p.stop)}
    d.update({"prompt": r.prompt} if r.prompt is not None else {"messages": list(r.messages)})
    return json.dumps(d, ensure_ascii=False)


def _request_from_json(text: str) -> Request:
    d = json.loads(text)
    if not d["stop"]:
        del d["stop"]
    return Request.from_dict(d)


def pass_blocks(passes, requests: Sequence[Request], prompt_ids: Sequence[list[int]]) -> list:
    """One pandas DataFrame per engine pass (a Ray Data block each): its rows in order."""
    import pandas as pd
    return [pd.DataFrame({"row": list(b.rows), "pass": [b.index] * len(b.rows), "pass_size": [len(b.rows)] * len(b.rows),
                          "position": list(range(len(b.rows))),
                          "request": [_request_to_json(requests[i]) for i in b.rows],
                          "prompt_ids": [list(prompt_ids[i]) for i in b.rows]}) for b in passes]


@dataclass(frozen=True)
class ClusterShape:
    nodes: int
    cpus: float
    gpus: float

    def replicas_per_node(self, replicas: int) -> int:
        return math.ceil(replicas / self.nodes)

    def actor_resources(self, replicas: int) -> dict:
        """Each replica's share of a node: its CPUs, and its GPUs where the cluster has any."""
        k = self.replicas_per_node(replicas)
        out = {"num_cpus": max(1.0, float(self.cpus // self.nodes // k))}
        if self.gpus:
            out["num_gpus"] = self.gpus / self.nodes / k
        return out


def cluster_shape(ray) -> ClusterShape:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return ClusterShape(max(1, len(nodes)), float(res.get("CPU", 0)), float(res.get("GPU", 0)))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that takes no connection is one line, not Ray's retries."""
    import socket
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RequestError(f"--ray-address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RequestError(f"--ray-address {address!r}: no Ray cluster answers there ({e.strerror or e})") from None


def run_replicas(llm, requests: Sequence[Request], *, skip, replicas: int | None, address: str | None,
                 config: dict, say) -> dict[int, tuple[Completion, str]]:
    """Every row of `requests` not in `skip`, run by `replicas` Ray actors: {row: (completion, replica)}.
    `llm` (no engine) gives the job's schedule; `config` the ReplicaConfig fields besides the job's. Without
    `replicas`, one a node of the cluster."""
    ray = import_ray()
    import logging

    from hrm.spec import Workload
    prompt_ids = llm.encode(requests)
    llm.plan_for(requests, prompt_ids)
    passes = llm.passes(requests, skip)
    if not passes:
        return {}
    started = not ray.is_initialized()
    if address:
        check_reachable(address)
    if started:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
    try:
        shape = cluster_shape(ray)
        replicas = replicas or shape.nodes
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        workload = Workload.from_prompt_lens([len(p) for p in prompt_ids], max(r.params.max_tokens for r in requests))
        cfg = ReplicaConfig(workload=workload, replicas_per_node=shape.replicas_per_node(replicas),
                            fault_file=os.environ.get(FAULT_ENV) or None, **config)
        say(f"ray: {replicas} replicas on {shape.nodes} node{'s' if shape.nodes > 1 else ''} "
            f"({cfg.replicas_per_node} a node), {len(passes)} passes of N <= {llm.policy.batch_size}")
        ds = ray.data.from_pandas(pass_blocks(passes, requests, prompt_ids))
        out = ds.map_batches(Replica, batch_size=None, batch_format="numpy", fn_constructor_kwargs={"config": cfg},
                             compute=ray.data.ActorPoolStrategy(size=replicas), **shape.actor_resources(replicas))
        got: dict[int, tuple[Completion, str]] = {}
        for r in out.iter_rows():
            row = int(r["row"])
            c = Completion.from_dict(json.loads(r["completion"]))
            if row in got and got[row][0] != c:
                raise RuntimeError(f"row {row} came back twice with different completions")
            got[row] = (c, f"{r['replica']} {r['policy']}")
    finally:
        if started:
            ray.shutdown()
    want = {i for b in passes for i in b.rows}
    if set(got) != want:
        missing = sorted(want - set(got))
        raise RuntimeError(f"{len(missing)} rows did not come back from the replicas (first: {missing[:3]})")
    return got
