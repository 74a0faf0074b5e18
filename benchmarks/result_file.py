"""The header every benchmark result file carries (the command that made it, the date, the machine and its
device), written atomically only once the benchmark has finished."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hrm.atomic import atomic_write_text  # noqa: E402


def write_result(path, script: str, argv, **fields) -> dict:
    """{command, date, host, device, **fields} as JSON at `path` (None: not written); returns the dict.
    `argv`: the script's arguments (None: sys.argv[1:])."""
    import torch

    result = {"command": " ".join([script] + list(argv if argv is not None else sys.argv[1:])),
              "date": _dt.date.today().isoformat(), "host": platform.node(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **fields}
    if path:
        atomic_write_text(Path(path), json.dumps(result, indent=2))
    return result
