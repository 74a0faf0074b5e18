"""The output file of a batch job: JSON Lines of completions, appended one finished batch at a time by
replacing the whole file (temp + rename), so that an interrupted job leaves a valid file, and a job run
again skips the ids already in it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hrm.atomic import atomic_write

from .requests import Completion, RequestError


def read_completions(path: str | Path) -> dict[str, Completion]:
    """The completions already in an output file by id ({} when there is no file)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read output file {path}: {e}") from None
    done = {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            c = Completion.from_dict(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise RequestError(f"{path}:{no}: not a completion line of this tool; give another --output") from None
        done[c.id] = c
    return done


def append_completions(path: str | Path, completions: list[Completion]) -> None:
    """The file as it was plus one line per completion, written atomically."""
    path = Path(path)
    lines = "".join(c.to_json() + "\n" for c in completions)

    def write(f) -> None:
        if path.exists():
            with path.open("rb") as old:
                shutil.copyfileobj(old, f)
            if path.stat().st_size and not _ends_with_newline(path):
                f.write(b"\n")
        f.write(lines.encode("utf-8"))

    atomic_write(path, write, binary=True)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
