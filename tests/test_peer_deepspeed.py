"""The DeepSpeed ZeRO-Inference peer's pure helpers (benchmarks/peer_deepspeed.py): its DeepSpeed config, the
host-store and GPU-cap arithmetic, and its one-line refusals. None of this needs DeepSpeed or a GPU."""
import importlib.util
import sys

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def peer():
    return load_benchmark("peer_deepspeed")


class _Cfg:
    hidden_size = 4096
    num_hidden_layers = 8
    num_key_value_heads = 8
    num_attention_heads = 32
    head_dim = 128


def test_ds_config_is_zero_inference(peer):
    cfg = peer.build_ds_config(_Cfg())
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z["stage3_prefetch_bucket_size"] == z["stage3_max_live_parameters"] == 2 * 4096 * 4096
    assert z["stage3_param_persistence_threshold"] == 4096
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and "optimizer" not in cfg
    cfg = peer.build_ds_config(_Cfg(), pin_memory=False,
                               overrides={"stage3_prefetch_bucket_size": 1e9, "offload_param": {"buffer_count": 5}})
    z = cfg["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 10 ** 9 and isinstance(z["stage3_prefetch_bucket_size"], int)
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False, "buffer_count": 5}


def test_host_store_rounds_pinned_blocks_to_powers_of_two(peer):
    assert [peer.next_pow2(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    gib = 2 ** 30
    shapes = {"experts.gate_up": (8, 28672, 4096), "experts.down": (8, 4096, 14336), "norm": (4096,)}
    pinned = peer.host_store_bytes(shapes, 4096, pinned=True)
    assert pinned["weights_total_bytes"] == int(2.625 * gib) + 8192
    assert pinned["weights_offloaded_bytes"] == int(2.625 * gib)        # the norm persists on the GPU
    assert pinned["host_store_bytes_est"] == 3 * gib                   # 1.75 -> 2 GiB and 0.875 -> 1 GiB
    assert peer.host_store_bytes(shapes, 4096, pinned=False)["host_store_bytes_est"] == int(2.625 * gib)


def test_gpu_cap_leaves_the_missing_layers_kv_out(peer):
    cfg = _Cfg()
    per_layer = 16 * 288 * 2 * 8 * 128 * 2
    assert peer.kv_bytes(cfg, 16, 288, 1) == per_layer
    assert peer.gpu_cap_bytes(cfg, 32, 16, 256, 32, 24 * 2 ** 30) == 24 * 2 ** 30 - 24 * per_layer
    cfg.num_hidden_layers = 32
    assert peer.gpu_cap_bytes(cfg, 32, 16, 256, 32, 24 * 2 ** 30) == 24 * 2 ** 30


def test_parse_args_defaults(peer):
    a = peer.parse_args([])
    assert a.gpu_budget_gib == 24 and a.prompt_len == 256 and a.gen_len == 32 and a.stop_after_ok == 0
    assert [int(b) for b in a.batch_sizes.split(",")] == sorted(map(int, a.batch_sizes.split(",")), reverse=True)


def test_refuses_in_one_line_without_cuda(peer, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert peer.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peer_deepspeed: no CUDA device")
    assert peer.main(["--zero-override", "{nope", "--tiny"]) == 2


def test_full_model_host_store_estimate(peer):
    pytest.importorskip("transformers")
    config, full = peer.build_config(peer.parse_args([]))
    store = peer.host_store_bytes(peer.param_shapes(config), config.hidden_size, pinned=True)
    assert full == 32 and 86 * 2 ** 30 < store["weights_total_bytes"] < 88 * 2 ** 30
    assert 98 * 2 ** 30 < store["host_store_bytes_est"] < 100 * 2 ** 30


def test_without_deepspeed_the_tiny_run_says_how_to_install(peer, capsys, tmp_path):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    assert peer.main(["--tiny", "--output", str(tmp_path / "x.json")]) == 2
    assert "pip install --no-index --no-deps .whl/deepspeed/*.whl" in capsys.readouterr().err
    assert "deepspeed" not in sys.modules
