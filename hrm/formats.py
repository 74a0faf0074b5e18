"""Storage formats of routed-expert weights: bits per weight and the scales stored beside them.

One home for their byte counts: the runtime sizes its packed tensors from `ExpertFormat.matrix_bytes`
(runtime.quant), and pricing reads the same numbers. A matrix is W [out_features, in_features] as the
runtime stores it (y = x @ W.T). Scales are fp16, symmetric, round to nearest:
  bf16  16 bits, no scales;
  int8  8 bits, one scale per output channel (row of W);
  int4  4 bits, two to a byte, one scale per group of 128 consecutive inputs of a row.
"""
from __future__ import annotations

from dataclasses import dataclass

SCALE_BYTES = 2          # fp16

DEQUANT_CHUNK_ELEMS = 1 << 24
"""The runtime dequantizes a layer's quantized experts into the compute dtype (runtime.quant) in chunks of
at most this many weights (whole rows), which bounds its fp32 temporaries."""
DEQUANT_TEMP_BYTES_PER_ELEM = 1.25
"""Live temporaries per weight of a chunk: int4's masked or shifted nibbles and their re-centred copy, a
byte each for half the weights, and the fp32 scales (4 bytes per group of 128: 0.03), rounded up (int8 reads
its bytes in place and needs only the scales)."""


@dataclass(frozen=True)
class ExpertFormat:
    name: str
    bits: int            # per weight
    group: int = 0       # inputs of a row that share one scale; 0: the whole row (per output channel)

    @property
    def scaled(self) -> bool:
        return self.bits < 16

    def group_width(self, in_features: int) -> int:
        """Inputs that share one scale in a row of `in_features`."""
        return self.group or in_features

    def groups_per_row(self, in_features: int) -> int:
        return in_features // self.group_width(in_features) if self.scaled else 0

    def check(self, in_features: int) -> None:
        """Refuse a row width the format cannot store (int4: a whole number of groups)."""
        if self.group and in_features % self.group:
            raise ValueError(f"{self.name} experts need input widths divisible by {self.group}, got {in_features}")

    def matrix_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one stored [out_features, in_features] matrix: its packed weights and its scales."""
        self.check(in_features)
        data = out_features * in_features * self.bits // 8
        return data + out_features * self.groups_per_row(in_features) * SCALE_BYTES

    @property
    def dequant_traffic_bytes_per_weight(self) -> float:
        """Memory traffic per weight of the runtime's dequantization into bf16 (runtime.quant.dequantize):
        int8 reads its byte and writes 2; int4 runs once per nibble, each pass reading the packed bytes,
        masking or shifting and re-centring them through two byte temporaries, and writing half the weights."""
        return 1 + 2 if self.bits == 8 else 2 * (0.5 + 4 * 0.5 + 1)

    def bytes_per_weight(self, in_features: int) -> float:
        """Stored bytes per weight of a row of `in_features` inputs, scales included."""
        return self.matrix_bytes(1, in_features) / in_features


EXPERT_FORMATS = {"bf16": ExpertFormat("bf16", 16), "int8": ExpertFormat("int8", 8),
                  "int4": ExpertFormat("int4", 4, group=128)}


def expert_format(name: str) -> ExpertFormat:
    if name not in EXPERT_FORMATS:
        raise ValueError(f"unknown expert format {name!r}; known: {', '.join(EXPERT_FORMATS)}")
    return EXPERT_FORMATS[name]


# ---- KV cache formats ---------------------------------------------------------------------------------
KV_SCALE_BYTES = 4       # fp32: one scale per token, kv head and K or V

ATTENTION_CHUNK_SEQUENCES = 16
"""Sequences the CPU decode attention over an 8-bit cache dequantizes at a time (runtime.cpu_attention): its
fp32 workspace holds one chunk's K (then V), so it stays in the cores' caches instead of materialising a
full-precision copy of the cache."""


@dataclass(frozen=True)
class KVFormat:
    """How the KV cache stores one token's K (or V) of one kv head, a vector of head_dim values:
      bf16, fp16, fp32  as they are, no scales;
      int8  symmetric round to nearest, q in [-127, 127], one fp32 scale max|x| / 127 per vector;
      fp8   float8_e4m3fn of x / scale, one fp32 scale max|x| / 448 per vector (448: e4m3fn's largest).
    The scale is per token and per kv head, so appending a token never rescales what is cached."""
    name: str
    elem_bytes: int
    qmax: float = 0.0        # the largest stored magnitude of a scaled format; 0: stored as it is
    cpu_attention_time_of_compute: float = 1.0   # its CPU attention's time per call over the compute dtype's (KV_FORMATS)

    @property
    def scaled(self) -> bool:
        return self.qmax > 0

    def vector_bytes(self, width: int) -> int:
        """Bytes of one stored vector of `width` values (one token's K or V of one kv head): the values
        and, for a scaled format, its scale."""
        return width * self.elem_bytes + (KV_SCALE_BYTES if self.scaled else 0)

    def bytes_per_elem(self, width: int) -> float:
        """Stored bytes per cached value, scales included, for vectors of `width` values."""
        return self.vector_bytes(width) / width


KV_FORMATS = {"bf16": KVFormat("bf16", 2), "fp16": KVFormat("fp16", 2), "fp32": KVFormat("fp32", 4),
              "int8": KVFormat("int8", 1, 127.0, cpu_attention_time_of_compute=0.685),
              "fp8": KVFormat("fp8", 1, 448.0, cpu_attention_time_of_compute=1.42)}
"""cpu_attention_time_of_compute: the runtime's CPU decode attention over a scaled 8-bit cache (its fused kernel,
runtime.cpu_attention_fused) takes this many times the time of its attention over the same sequences and context
cached in the compute dtype (SDPA): the kernel is bound by its arithmetic more than by the bytes it reads, so
half the bytes is not half the time. Measured on the H200 host, 14 threads, Mixtral's shapes at context 288:
int8 (2026-12-03 call 29, the tiled kernel, benchmarks/results/whole_model/h200-2026-12-03-call29/
cpu_attention_rate.json) 11.67 / 16.80 ms at 600 sequences and 33.64 / 49.74 at 1,800 (geometric mean 0.685);
fp8 (call 18, the kernel before the tiles: not measured since) 27.5 / 18.0 and 83.4 / 63.2 (1.42)."""
SCALED_KV_FORMATS = tuple(n for n, f in KV_FORMATS.items() if f.scaled)


def kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise ValueError(f"unknown KV format {name!r}; known: {', '.join(KV_FORMATS)}")
    return KV_FORMATS[name]
