"""Write files atomically: a reader sees the old file or the new one, never half of one.

`Outputs` stages every file a command writes as a temporary file next to its target and renames them
onto their targets only at `commit()`, after every step that can fail (a figure is drawn before the plan
file is replaced). An exception or Ctrl-C before then removes the temporary files and leaves the targets as
they were. A target that exists and is not a regular file (/dev/stdout, /dev/full, a FIFO) is written in
place. Failures are one `OutputError` naming the file and the reason (EISDIR, EACCES, ENOSPC, ...).
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable


class OutputError(OSError):
    """A file that cannot be written; the message names it and says why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _failed(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a target that is a directory or whose directory is not writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: Is a directory")
    parent = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: Permission denied")
    return path


def _in_place(path: Path) -> bool:
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


class Outputs:
    """Files staged now and renamed onto their targets together by commit(); as a context manager, an
    exception (KeyboardInterrupt included) discards whatever was staged."""

    def __init__(self):
        self._staged: list[tuple[str, Path]] = []
        self._direct: list[tuple[Path, Callable, bool]] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()

    def add(self, path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
        """Write `path`'s new contents, through write(file), to a temporary file beside it now."""
        path = check_writable(path)
        if _in_place(path):
            self._direct.append((path, write, binary))
            return path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise _failed(path, e) from None
        self._staged.append((tmp, path))
        try:
            with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as e:
            raise _failed(path, e) from None
        return path

    def add_text(self, path: str | os.PathLike, text: str) -> Path:
        return self.add(path, lambda f: f.write(text))

    def commit(self) -> None:
        """Rename every staged file onto its target, then write the in-place ones."""
        try:
            while self._staged:
                tmp, path = self._staged[0]
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise _failed(path, e) from None
                self._staged.pop(0)
            for path, write, binary in self._direct:
                try:
                    with open(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                        write(f)
                except OSError as e:
                    raise _failed(path, e) from None
        finally:
            self.discard()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            Path(tmp).unlink(missing_ok=True)
        self._staged.clear()
        self._direct.clear()


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call write(file) on a temporary file in the target's directory, fsync it, give it the usual
    permissions (mkstemp makes 0600), then os.replace it onto `path`."""
    with Outputs() as out:
        out.add(path, write, binary=binary)
        out.commit()
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))
