"""Atomic figure writes: render to a temporary file next to the target, then os.replace it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_figure(fig, path, dpi: int = 120, **kw) -> Path:
    """Write `fig` to `path` (format from the suffix, PNG by default) atomically; returns the path.

    A reader never sees a half-written file: the figure is rendered to a temporary file in the same
    directory and moved into place with os.replace.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, **kw)
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
