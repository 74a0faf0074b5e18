"""Replicas sharing a node, priced by the HRM as one replica on its share (optimizer/replicas.py): the host's
memory, cores, DRAM and links divided, each replica's own budgets, and `plan --replicas auto|K` taking the
count the pricing says is best and the whole job's time on a cluster."""
import json
import math
from dataclasses import replace

import pytest

from hrm.hardware import load_profile
from hrm.hf_config import load_model
from hrm.rates import Setting, cpu_attention_bytes_per_s, cpu_dram_bytes_per_s, gpu_gemm_flops_per_s, h2d_bytes_per_s
from hrm.spec import Workload
from moe_lightning_cli.main import main
from optimizer.replicas import candidate_counts, choose, plan_replica, replica_view
from optimizer.space import Budgets, SearchError

WL = Workload(77.0, 418, 128)
MIXTRAL = load_model("mixtral-8x7b")


def _rates(spec, hw) -> dict:
    s = Setting(spec, hw, WL)
    return {"h2d": float(h2d_bytes_per_s(s, 64 * 2**20)), "dram": float(cpu_dram_bytes_per_s(s)),
            "attention": float(cpu_attention_bytes_per_s(s, 1)), "gemm": float(gpu_gemm_flops_per_s(s, 4096))}


def test_two_replicas_on_one_node_get_half_the_host_and_share_its_link():
    two = load_profile("2xt4-s6")
    switch = replace(two, link=replace(two.link, gpus_per_link=2))      # both GPUs behind one link
    assert (two.num_links, switch.num_links) == (2, 1)
    for node, links_each, link_rate in ((two, 1, 1.0), (switch, 1, 0.5)):
        v = replica_view(node, 2)
        assert v.gpu.count == 1 and v.gpu.memory_bytes == node.gpu.memory_bytes
        assert v.cpu.memory_bytes == node.cpu.memory_bytes / 2 and v.cpu.cores == node.cpu.cores // 2
        assert v.num_links == links_each
        assert v.link.h2d_bytes_per_s == pytest.approx(node.link.h2d_bytes_per_s * link_rate)
        whole, each = _rates(MIXTRAL, node), _rates(MIXTRAL, v)
        # the node's links, halved either way (a shared link keeps its latency: a little over half)
        assert whole["h2d"] / 2 <= each["h2d"] <= whole["h2d"] / 2 * 1.005
        assert each["dram"] == pytest.approx(whole["dram"] / 2)
        assert each["attention"] == pytest.approx(whole["attention"] / 2)  # CPU attention: cores and DRAM shared
        assert each["gemm"] == pytest.approx(whole["gemm"] / 2)          # one of two GPUs
    assert replica_view(two, 1) is two


def test_replicas_sharing_one_measured_gpu_split_its_memory_and_rates():
    hw = load_profile("h200-measured")
    v = replica_view(hw, 2)
    whole, each = _rates(MIXTRAL, hw), _rates(MIXTRAL, v)
    assert v.gpu.count == 1 and v.gpu.memory_bytes == hw.gpu.memory_bytes / 2
    for key in ("h2d", "dram", "attention", "gemm"):
        assert each[key] == pytest.approx(whole[key] / 2), key
    assert v.measured.gpu_hbm_bytes_per_s == pytest.approx(hw.measured.gpu_hbm_bytes_per_s / 2)


@pytest.mark.parametrize("k, words", [(3, "a divisor or a multiple of 4"), (0, ">= 1"), (64, "more replicas than")])
def test_a_replica_count_the_node_cannot_split_is_refused(k, words):
    with pytest.raises(SearchError, match=words):
        replica_view(load_profile("4xt4-s7"), k)


def test_each_replica_is_planned_within_its_share_of_the_node_budgets():
    hw = load_profile("4xt4-s7")
    node = Budgets.from_hardware(hw)
    one, two = plan_replica(MIXTRAL, hw, WL, 1), plan_replica(MIXTRAL, hw, WL, 2)
    assert two.budgets.cpu_bytes == pytest.approx(node.cpu_bytes / 2)
    assert two.budgets.gpu_bytes == pytest.approx(node.gpu_bytes / 2)
    assert two.memory.cpu_bytes <= two.budgets.cpu_bytes and two.hardware.gpu.count == 2
    assert one.budgets == node and one.hardware is hw
    # half the host memory holds fewer sequences: each replica's N is below half of one replica's
    assert two.policy.batch_size < one.policy.batch_size / 2
    # four replicas cannot each hold Mixtral's 87 GiB of weights in a quarter of 416 GB
    with pytest.raises(SearchError, match="CPU memory needs"):
        plan_replica(MIXTRAL, hw, WL, 4)


@pytest.mark.parametrize("model, workload", [("olmoe-1b-7b", Workload(1024.0, 1024, 16)), ("mixtral-8x7b", WL)])
def test_choose_takes_the_count_with_the_most_node_throughput(model, workload):
    spec, hw = load_model(model), load_profile("4xt4-s7")
    c = choose(spec, hw, workload)
    assert [o.replicas_per_node for o in c.options] == candidate_counts(hw) == [1, 2, 4, 8]
    priced = {}
    for k in candidate_counts(hw):
        try:
            priced[k] = k * plan_replica(spec, hw, workload, k).throughput_tok_s
        except SearchError:
            priced[k] = 0.0
    assert {o.replicas_per_node: o.node_tok_s for o in c.options} == pytest.approx(priced)
    top = max(priced.values())
    assert c.best.replicas_per_node == min(k for k, t in priced.items() if t >= 0.999 * top)


def test_auto_is_not_always_one_count():
    """The two workloads above are chosen so that the pricing disagrees: a chooser that ignored it fails one."""
    hw = load_profile("4xt4-s7")
    picks = {choose(load_model(m), hw, w).best.replicas_per_node
             for m, w in (("olmoe-1b-7b", Workload(1024.0, 1024, 16)), ("mixtral-8x7b", WL))}
    assert len(picks) == 2


def _plan_json(capsys, *args) -> dict:
    assert main(["plan", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_replicas_auto_json_prices_the_cluster_job(capsys):
    from moe_lightning_cli.plan import workload_job
    args = ("--hardware", "4xt4-s7", "--model", "olmoe-1b-7b", "--prompt-len", "1024", "--gen-len", "16",
            "--replicas", "auto", "--num-prompts", "10000")
    one, three = _plan_json(capsys, *args), _plan_json(capsys, *args, "--nodes", "3")
    r = three["replicas"]
    assert (r["nodes"], r["gpus_per_node"], r["mode"]) == (3, 4, "auto")
    fits = [o for o in r["options"] if o["fits"]]
    best = max(fits, key=lambda o: (o["node_tok_s"], -o["replicas_per_node"]))
    assert r["chosen"]["replicas_per_node"] == best["replicas_per_node"]
    assert three["plan"]["policy"]["batch_size"] == best["batch_size"]
    for o in fits:
        k = o["replicas_per_node"]
        assert o["node_tok_s"] == pytest.approx(k * o["replica_tok_s"])
        assert o["cluster_tok_s"] == pytest.approx(3 * o["node_tok_s"])
        plan = plan_replica(load_model("olmoe-1b-7b"), load_profile("4xt4-s7"), Workload(1024.0, 1024, 16), k)
        want = workload_job(plan, math.ceil(10000 / (3 * k))).seconds
        assert o["job"]["seconds"] == pytest.approx(want)
        assert o["job"]["prompts_per_replica"] == math.ceil(10000 / (3 * k))
    assert r["chosen"]["job"]["seconds"] < one["replicas"]["chosen"]["job"]["seconds"] / 2.5   # 3 nodes


def test_plan_replicas_given_count_and_its_table(capsys):
    d = _plan_json(capsys, "--hardware", "4xt4-s7", "--replicas", "2")
    assert [o["replicas_per_node"] for o in d["replicas"]["options"]] == [2]
    assert d["plan"]["hardware"]["name"] == "4xt4-s7 (1 of 2 replicas)"
    assert main(["plan", "--hardware", "4xt4-s7", "--replicas", "auto", "--num-prompts", "5000"]) == 0
    out = capsys.readouterr().out
    assert "replicas per node on 4xt4-s7" in out and "the whole job: 5,000 prompts" in out
    assert "4 a node: mixtral-8x7b does not fit" in out


@pytest.mark.parametrize("args, words", [
    (["--replicas", "3", "--hardware", "4xt4-s7"], "a divisor or a multiple of 4"),
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "two"], "--replicas"),
    (["--replicas", "auto", "--plot", "x.png"], "--plot does not apply"),
    (["--replicas", "4", "--hardware", "4xt4-s7"], "CPU memory needs"),
])
def test_bad_replica_requests_are_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
