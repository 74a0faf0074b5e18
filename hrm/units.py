"""Units: the constants, reading sizes as written and formatting sizes and durations, in one place.

Sizes are read as written (GB = 10^9, GiB = 2^30; a bare G/M/T is binary, as in `free -g`) and printed
in binary units, in tables and figures alike. Rates are named *_per_s.
"""
from __future__ import annotations

import math
import re

KiB, MiB, GiB, TiB = 2 ** 10, 2 ** 20, 2 ** 30, 2 ** 40
KB, MB, GB, TB = 1e3, 1e6, 1e9, 1e12
TFLOPS = 1e12

_UNITS = {"": 1.0, "b": 1.0, "kb": KB, "mb": MB, "gb": GB, "tb": TB,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class SizeError(ValueError):
    """A size that cannot be read (the message quotes it)."""


def parse_size(text) -> float:
    """Bytes from '16GiB', '24GB', '500MB', '1.5TiB' or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise SizeError(f"cannot read memory size {str(text)!r}: use a number with a unit such as "
                            f"16GiB, 24GB or 500MB")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0 or not math.isfinite(value):
        raise SizeError(f"memory size must be positive, got {text!r}")
    return value


def format_size(n_bytes: float) -> str:
    """'14.40 GiB': binary units, two decimals."""
    n = float(n_bytes)
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_seconds(t: float) -> str:
    """'2.31 s', '14.20 ms', '35.0 us'."""
    if t >= 1:
        return f"{t:,.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:,.2f} ms"
    return f"{t * 1e6:,.1f} us"
