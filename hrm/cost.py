"""Costs are values that add: FLOPs and bytes read or written, by tensor class.

Fields may be floats or numpy arrays (one entry per candidate policy), so the same formulas price one
policy or a whole grid.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    weight_bytes: float = 0.0   # parameters read
    kv_bytes: float = 0.0       # KV cache read and appended
    act_bytes: float = 0.0      # activations read and written

    @property
    def bytes(self):
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def intensity(self):
        """FLOP per byte over every byte the operator touches."""
        return self.flops / self.bytes

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, k) -> "Cost":
        return Cost(*(getattr(self, f.name) * k for f in fields(self)))

    __rmul__ = __mul__

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"bytes": self.bytes}
