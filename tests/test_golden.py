"""The cost model's predictions for every committed policy stay what tests/golden/predictions.json says:
a change meant to reshape the code moves none of them. A change meant to move them regenerates the file
(`python tests/golden/predictions.py --write`) and the commit says why."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).with_name("golden")))

import predictions as golden  # noqa: E402


@pytest.fixture(scope="module")
def now():
    return golden.predictions()


def test_every_committed_policy_is_priced_as_recorded(now):
    recorded = json.loads(golden.GOLDEN.read_text())
    assert set(now) == set(recorded), "policies added or removed: regenerate tests/golden/predictions.json"
    assert len(recorded) >= 30
    moved = {key: (field, recorded[key][field], value) for key, numbers in now.items()
             for field, value in numbers.items()
             if (value != recorded[key][field] if isinstance(value, str)
                 else value != pytest.approx(recorded[key][field], rel=1e-9))}
    assert not moved, f"{len(moved)} predictions moved, e.g. {next(iter(moved.items()))}"


def test_the_recorded_numbers_are_sane():
    """The file itself: every run of the whole-model sweeps priced between 100 and 5,000 tok/s (the
    H200's whole runs measured 209-1,499) and within 200 GB on each level (a unit slip of 10^3 or more in a
    profile key would not pass unnoticed, as it could in a regenerated file). Offloading plans hold more on
    the host than on the GPU; a small model's plan (OLMoE, KV on the GPU) may not."""
    recorded = json.loads(golden.GOLDEN.read_text())
    for key, numbers in recorded.items():
        assert 100 < numbers["tok_s"] < 5000, key
        assert 0 < numbers["gpu_bytes"] < 200e9 and 0 < numbers["cpu_bytes"] < 200e9, key
        if "mixtral" in key or "qwen3" in key:
            assert numbers["gpu_bytes"] < numbers["cpu_bytes"], key
