"""The hardware profile's schema: every key each section of a profile TOML may hold (hrm/hardware.py reads
them, runtime/probe/profile_toml.py writes them), and the one check that a file holds no other."""
from __future__ import annotations

import re
import tomllib
from typing import Mapping

from .units import GB, GiB, MiB, TFLOPS

_UNITS = {"gb_per_s": GB, "tflops": TFLOPS, "ns_per_token": 1e-9, "mib": MiB, "gib": GiB, "gb": GB, "us": 1e-6,
          "ms": 1e-3}
_UNIT_IN_KEY = re.compile(r"(?:^|_)(" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")(?:_|$)")


def unit_of(key: str) -> float:
    """The SI value of one unit of a profile key, read from the unit word in its name: `h2d_gb_per_s` 1e9
    (bytes/s), `gpu_moe_tflops` 1e12 (FLOP/s), `decode_visit_us_grouped_by_schedule` 1e-6 (s),
    `h2d_sizes_mib` 2^20 (bytes); 1 for counts, shapes and fractions. Reader and writer both convert with it."""
    m = _UNIT_IN_KEY.search(key)
    return _UNITS[m.group(1)] if m else 1.0


MEMORY_KEYS = {"cuda_context_gib": "cuda_context_bytes", "process_baseline_gib": "process_baseline_bytes",
               "gpu_allocator_frac": "gpu_allocator_frac"}
"""[memory] keys -> MemoryProfile fields (in SI by unit_of)."""


_UNIT_KEYS = frozenset({"name", "memory_gib", "memory_gb", "mem_gb_per_s", "tflops", "count", "cores", "source"})
PROFILE_KEYS = {
    "": frozenset({"name", "description", "gpu", "cpu", "link", "measured", "calibration", "memory"}),
    "gpu": _UNIT_KEYS,
    "cpu": _UNIT_KEYS,
    "link": frozenset({"h2d_gb_per_s", "d2h_gb_per_s", "duplex_gb_per_s", "pageable_h2d_gb_per_s", "gpus_per_link",
                       "peer_gb_per_s", "source"}),
    # properties of the machine, as micro-benchmarks of torch measure them
    "measured": frozenset({
        "gpu_gemm_tokens", "gpu_gemm_tflops", "h2d_sizes_mib", "h2d_gb_per_s", "gpu_hbm_gb_per_s",
        "cpu_dram_gb_per_s", "cpu_dram_copy_gb_per_s", "method", "date",
        # measured and kept as the record (the cost model does not read them)
        "d2h_sizes_mib", "d2h_gb_per_s", "model_shapes", "elapsed_s", "git_commit",
        "python_version", "torch_version", "cuda_version", "numpy_version", "moe_lightning_version",
        # old forms, refused with their new names
        "gpu_moe_tokens", "gpu_prefill_tflops"}),
    # the runtime's own code on this machine: its MoE and prefill layers, its CPU attention kernel alone and
    # inside its decode loop, the host's fixed work per visit
    "calibration": frozenset({
        "gpu_moe_shapes", "gpu_moe_tokens_per_expert", "gpu_moe_tflops", "gpu_prefill_tokens",
        "gpu_prefill_rest_tflops", "gpu_prefill_rest_shapes", "gpu_prefill_rest_tokens_by_shape",
        "gpu_prefill_rest_tflops_by_shape", "prefill_pass_ns_per_token", "cpu_attention_gb_per_s",
        "cpu_attention_overlapped_gb_per_s", "cpu_attention_overlapped_micro_batches",
        "cpu_attention_overlapped_gb_per_s_by_micro_batch", "cpu_attention_loop_shapes",
        "cpu_attention_loop_call_ms", "decode_visit_us", "decode_visit_us_by_schedule",
        "decode_visit_us_grouped_by_schedule", "grouped_above_tokens", "cpu_attention_call_us",
        "cpu_attention_time_of_compute_by_kv_format", "cpu_attention_loop_time_of_compute_by_kv_format",
        # kept as the record
        "cpu_attention_shapes", "cpu_attention_gb_per_s_by_shape"}),
    "memory": frozenset(MEMORY_KEYS) | {"source"},
}
"""Every key a profile may hold, per section ("" the top level): a key outside it is refused, naming it, and
a key of another section is refused naming the section it belongs in."""


def misplaced_or_unknown_key(data: Mapping) -> str | None:
    """The first key of a profile's parsed TOML that PROFILE_KEYS does not allow where it stands, as the
    message that names it (and the section it belongs in, where it has one); None when every key is known."""
    for section, known in PROFILE_KEYS.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, Mapping):
            continue                                    # the section's own reader says what it must be
        label = f"[{section}]" if section else "the top level"
        for key in sorted(k for k in table if k not in known):
            home = next((s for s, keys in PROFILE_KEYS.items() if s and key in keys), None)
            if home == "calibration" and section == "measured":
                return (f"{key!r} belongs in [calibration], not [measured] (the runtime's calibrations have "
                        f"their own section since 2026-12-02): `moe-lightning profile --upgrade FILE` moves them")
            if home:
                return f"{key!r} belongs in [{home}], not {label}"
        odd = sorted(k for k in table if k not in known)
        if odd:
            return f"unknown key(s) {', '.join(map(repr, odd))} in {label}; known: {', '.join(sorted(known))}"
    return None


_HEADER = re.compile(r"\s*\[([\w.]+)\]\s*(#.*)?$")


def upgrade_profile_text(text: str) -> str:
    """A profile written before the runtime's calibrations had their own section, with them moved from
    [measured] into a [calibration] section after it (each key with the comment lines just above it);
    every other line as it was. Text that has nothing to move comes back unchanged."""
    lines = text.splitlines()
    out: list[str] = []
    moved: list[str] = []
    pending: list[str] = []            # comment lines of [measured] not yet known to belong to a key
    section = ""

    def close_measured():
        if moved:
            out.extend(["", "[calibration]", *moved])
            moved.clear()

    for line in lines:
        header = _HEADER.match(line)
        if header:
            out.extend(pending)
            pending = []
            if section == "measured":
                if out and not out[-1].strip():
                    out.pop()
                close_measured()
                out.append("")
            section = header.group(1)
            out.append(line)
        elif section == "measured" and line.lstrip().startswith("#"):
            pending.append(line)
        elif section == "measured" and "=" in line and line.split("=", 1)[0].strip() in PROFILE_KEYS["calibration"]:
            moved.extend(pending + [line])
            pending = []
        else:
            out.extend(pending + [line])
            pending = []
    out.extend(pending)
    if section == "measured":
        close_measured()
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def replace_profile_keys(text: str, section: str, lines: Mapping[str, str | None]) -> str:
    """A profile's TOML `text` with the `key = value` line of each key of `lines` in [section] ("" the top
    level) replaced by lines[key] (a whole line, without its newline), or removed where that is None; a
    key the section lacks is added after the last of `lines`' keys it holds (after its last line where it
    holds none). A value written over several lines is replaced whole. Every other line, comments and line
    endings included, stays as it was. ValueError where the section is not in the text."""
    rows = text.splitlines(keepends=True)
    current, start, end = "", 0 if section == "" else None, len(rows)
    for i, row in enumerate(rows):
        header = _HEADER.match(row)
        if header and current == section and start is not None:
            end = i
            break
        if header:
            current = header.group(1)
            start = i + 1 if current == section else start
    if start is None:
        raise ValueError(f"no [{section}] section")
    eol = next((row[len(row.rstrip("\r\n")):] for row in rows if row.endswith("\n")), "\n")
    spans: dict[str, tuple[int, int]] = {}          # key -> its value's rows [i, j)
    i = start
    while i < end:
        m = _KEY_LINE.match(rows[i])
        j = i + 1
        if m:
            while j < end and not _parses("".join(rows[i:j])):
                j += 1                               # a value over several rows
            spans[m.group(1)] = (i, j)
        i = j
    last = max((spans[k][1] for k in lines if k in spans), default=None)
    if last is None:                                 # after the section's last non-blank row
        last = next((k + 1 for k in range(end - 1, start - 1, -1) if rows[k].strip()), start)
    added = [line + eol for k, line in lines.items() if k not in spans and line is not None]
    if added and last > 0 and not rows[last - 1].endswith(("\n", "\r")):
        rows[last - 1] += eol                        # the text's last row, without a newline
    edits = [(i, j, [] if lines[k] is None else [lines[k] + rows[j - 1][len(rows[j - 1].rstrip("\r\n")):]])
             for k, (i, j) in spans.items() if k in lines] + [(last, last, added)]
    for i, j, new in sorted(edits, key=lambda e: e[0], reverse=True):
        rows[i:j] = new
    return "".join(rows)


def _parses(toml: str) -> bool:
    try:
        tomllib.loads(toml)
    except tomllib.TOMLDecodeError:
        return False
    return True
