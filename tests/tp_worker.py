"""One rank of a tensor-parallel generation, for tests/test_tensor_parallel.py (run by torchrun):

    python -m torch.distributed.run --nproc-per-node N tests/tp_worker.py MODEL_DIR|- POLICY_JSON PROMPTS_JSON GEN OUT

MODEL_DIR: a checkpoint directory with its config.json, or `-` and a built-in model name in the environment's
TP_MODEL (synthetic weights). Each rank writes the tokens it generated to OUT.<rank> as JSON."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hrm.hf_config import load_model  # noqa: E402
from hrm.policy import Policy  # noqa: E402
from runtime import parallel  # noqa: E402
from runtime.engine import Engine  # noqa: E402

torch.set_num_threads(1)
model_dir, policy_json, prompts_json, gen, out = sys.argv[1:]
tp = parallel.from_environment("cpu")
spec = load_model(os.environ["TP_MODEL"] if model_dir == "-" else model_dir)
with Engine(spec, Policy(**json.loads(policy_json)), model_dir=None if model_dir == "-" else model_dir,
            dtype=torch.float32, tensor_parallel=tp, progress=False) as engine:
    tokens, _ = engine.generate(json.loads(prompts_json), int(gen))
Path(f"{out}.{tp.rank if tp else 0}").write_text(json.dumps(tokens))
parallel.shutdown(tp)
