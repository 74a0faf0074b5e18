"""Atomic figure writes: render to a temporary file next to the target, then os.replace it."""
from __future__ import annotations

from pathlib import Path

from hrm.atomic import atomic_write


def save_figure(fig, path, dpi: int = 120, *, outputs=None, **kw) -> Path:
    """Write `fig` to `path` (format from the suffix, PNG by default) atomically; returns the path.

    A reader never sees a half-written file: the figure is rendered to a temporary file in the same
    directory and moved into place with os.replace; with `outputs` (hrm.atomic.Outputs) only at its
    commit(), together with the command's other files.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    write = lambda f: fig.savefig(f, format=fmt, dpi=dpi, **kw)  # noqa: E731
    if outputs is not None:
        return outputs.add(path, write, binary=True)
    atomic_write(path, write, binary=True)
    return path
