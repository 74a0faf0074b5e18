"""The console script: subcommands, --json, one-line errors with exit code 2."""
import json

from moe_lightning_cli.main import main


def test_estimate_prints_breakdown_bound_by_link(capsys):
    """Mixtral-8x7B on the paper's T4 host, r_w = 0 and a small batch: the CPU-GPU link binds."""
    assert main(["estimate", "--hardware", "t4-s1", "-N", "32", "--mu", "8", "--weights-gpu-frac", "0"]) == 0
    out = capsys.readouterr().out
    assert "h2d <- binds" in out
    assert "CPU->GPU link" in out
    assert "throughput" in out


def test_estimate_json(capsys):
    assert main(["estimate", "--json", "--model", "qwen3-30b-a3b", "--hardware", "l4-s2", "-N", "128", "--mu", "32"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "qwen3-30b-a3b" and d["throughput_tok_s"] > 0
    assert d["memory_bytes"]["gpu_total"] > 0


def test_estimate_errors_are_one_line(capsys):
    assert main(["estimate", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err
    assert main(["estimate", "--gen-len", "0"]) == 2
    assert "--gen-len" in capsys.readouterr().err
    assert main(["estimate", "-N", "4", "--mu", "8"]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
    assert main(["estimate", "--hardware", "nowhere"]) == 2
    assert "unknown hardware profile" in capsys.readouterr().err
