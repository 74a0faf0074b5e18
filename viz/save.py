"""Atomic figure writes: render to a temporary file next to the target, then os.replace it."""
from __future__ import annotations

from pathlib import Path

from hrm.atomic import atomic_write


def save_figure(fig, path, dpi: int = 120, **kw) -> Path:
    """Write `fig` to `path` (format from the suffix, PNG by default) atomically; returns the path.

    A reader never sees a half-written file: the figure is rendered to a temporary file in the same
    directory and moved into place with os.replace.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, **kw), binary=True)
    return path
