"""The measured machine as a hardware profile (hrm/hardware_profiles/ format): profile_toml and
write_profile_toml.
"""
from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Sequence


from hrm.atomic import atomic_write_text
from hrm.hardware import HardwareProfile, load_profile, parse_profile

from hrm.profile_keys import replace_profile_keys, unit_of
from hrm.units import GiB, MiB

from .base import ProbeError
from .calibration import PREFILL_PASS_TOKENS, PREFILL_WEIGHTS_GPU_FRAC


CPU_ATTENTION_LOOP_KEYS = ("cpu_attention_overlapped_gb_per_s", "cpu_attention_overlapped_micro_batches",
                           "cpu_attention_overlapped_gb_per_s_by_micro_batch", "cpu_attention_loop_shapes",
                           "cpu_attention_loop_call_ms", "cpu_attention_loop_time_of_compute_by_kv_format")
CPU_ATTENTION_KEYS = ("cpu_attention_gb_per_s", "cpu_attention_shapes", "cpu_attention_gb_per_s_by_shape",
                      "cpu_attention_time_of_compute_by_kv_format", "cpu_attention_call_us") + CPU_ATTENTION_LOOP_KEYS
"""The [calibration] keys a profile holds about the runtime's CPU decode attention, the ones
`moe-lightning profile --only cpu-attention` re-measures (update_cpu_attention): the kernel alone by
(batch, ctx) (machine_profile's "CPU decode attention" step: the median rate, the shapes and the rate by
shape, and its time over each 8-bit KV format over bf16's); one call's fixed cost (calibration.cpu_attention_call_s, timed on runtime.cpu_attention.
decode_attention itself, hence the kernel's too, though runtime_overheads measures it beside the decode
visits, whose decode_visit_* keys are not attention and stay); and, needing a CUDA GPU, CPU_ATTENTION_LOOP_KEYS:
the kernel's calls inside the CGOPipe decode loop (calibration.attention_in_pipeline_by_micro_batch)."""


def _num(x: float, digits: int = 4) -> str:
    """A positive number with `digits` significant digits, as TOML."""
    x = float(x)
    if not 0 < x < float("inf"):
        raise ProbeError(f"cannot write {x!r} into a profile: every measured number must be positive")
    r = round(x, max(0, digits - 1 - int(math.floor(math.log10(x)))))
    return str(int(r)) if r == int(r) and abs(r) < 1e15 else repr(r)


def _str(s: str) -> str:
    return json.dumps(str(s))          # a JSON string is a valid TOML basic string


def _arr(xs: Sequence[float]) -> str:
    return "[" + ", ".join(_num(x) for x in xs) + "]"


def _table(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {_num(v)}" for k, v in d.items()) + " }"


# one line of a profile from a value in SI units, in the unit the key's name says (hrm.profile_keys.unit_of)
def _kv(key: str, si: float) -> str:
    return f"{key} = {_num(si / unit_of(key))}"


def _ka(key: str, si: Sequence[float]) -> str:
    return f"{key} = {_arr([x / unit_of(key) for x in si])}"


def _kt(key: str, si: dict) -> str:
    return f"{key} = {_table({k: v / unit_of(key) for k, v in si.items()})}"


def _kcurves(key: str, si: Sequence[Sequence[float]]) -> str:
    return f"{key} = [" + ", ".join(_arr([x / unit_of(key) for x in curve]) for curve in si) + "]"


def _gpu_section_from(hw: HardwareProfile) -> list[str]:
    u, lk = hw.gpu, hw.link
    src = f"from profile {hw.name!r} ({hw.path or 'built-in'}): "
    lines = ["[gpu]", f"name = {_str(u.name)}", f"count = {u.count}",
             _kv("memory_gib", u.memory_bytes), _kv("mem_gb_per_s", u.mem_bytes_per_s),
             _kt("tflops", u.peak_flops),
             f"source = {_str(src + u.source)}", "", "[link]",
             _kv("h2d_gb_per_s", lk.h2d_bytes_per_s), _kv("d2h_gb_per_s", lk.d2h_bytes_per_s),
             _kv("duplex_gb_per_s", lk.duplex_bytes_per_s)]
    if lk.pageable_h2d_bytes_per_s:
        lines.append(_kv("pageable_h2d_gb_per_s", lk.pageable_h2d_bytes_per_s))
    if lk.peer_bytes_per_s:
        lines.append(_kv("peer_gb_per_s", lk.peer_bytes_per_s))
    lines.append(f"source = {_str(src + lk.source)}")
    return lines


def _attention_kernel_lines(result: dict) -> list[str]:
    """[calibration]'s lines of the runtime's CPU decode attention kernel alone (machine_profile's
    "CPU decode attention" step): the median KV rate over its (batch, ctx) shapes, and by shape."""
    c, att = result["cpu"], result["cpu"]["attention"]
    h, kv, d = (result["shapes"][k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    return [f"# {att['kernel']}, {att['dtype']} K/V, {h}/{kv} heads, d {d}: median over (batch, ctx) below",
            _kv("cpu_attention_gb_per_s", c['attention_kv_bytes_per_s']),
            f"cpu_attention_shapes = {json.dumps(att['shapes'])}",
            _ka("cpu_attention_gb_per_s_by_shape", att['kv_bytes_per_s'])] + (
        [f"# ... its time over each 8-bit KV format's cache of the same values over the bf16 cache's, batch x ctx "
         f"{' x '.join(map(str, att['kv_format_shape']))}",
         _kt("cpu_attention_time_of_compute_by_kv_format", att["time_of_compute_by_kv_format"])]
        if att.get("time_of_compute_by_kv_format") else [])


def _attention_call_lines(rt: dict) -> list[str]:
    """[calibration]'s line of one CPU attention call's fixed cost (calibration.cpu_attention_call_s, in
    runtime_overheads' result `rt`)."""
    return [_kv("cpu_attention_call_us", rt['cpu_attention_call_s'])] if "cpu_attention_call_s" in rt else []


def _attention_loop_lines(rt: dict) -> list[str]:
    """[calibration]'s lines of the same kernel's calls inside the runtime's CGOPipe decode loop on the GPU
    (calibration.attention_in_pipeline_by_micro_batch, in runtime_overheads' result `rt`); none where it
    was not measured (no CUDA GPU)."""
    if not rt.get("cpu_attention_overlapped_bytes_per_s"):
        return []
    return [f"# the same kernel's calls inside the runtime's CGOPipe decode loop on the GPU, "
            f"[batch, ctx] = {rt['overlap_shape']}: the host also launches the GPU's work",
            _kv("cpu_attention_overlapped_gb_per_s", rt['cpu_attention_overlapped_bytes_per_s']),
            *(["# ... and by micro-batch size (ctx as above)",
               f"cpu_attention_overlapped_micro_batches = {json.dumps(rt['cpu_attention_overlapped_micro_batches'])}",
               _ka("cpu_attention_overlapped_gb_per_s_by_micro_batch",
                   rt['cpu_attention_overlapped_bytes_per_s_by_micro_batch'])]
              if len(rt.get("cpu_attention_overlapped_micro_batches", ())) > 1 else []),
            *(["# ... each setting's calls: [sequences, KV slots read per sequence, bytes per slot] and ms "
               "per call (hrm.rates fits fixed + per-sequence + per-byte costs)",
               f"cpu_attention_loop_shapes = {json.dumps(rt['cpu_attention_loop_shapes'])}",
               _ka("cpu_attention_loop_call_ms", rt['cpu_attention_loop_call_s'])]
              if len(rt.get("cpu_attention_loop_shapes", ())) >= 3 else []),
            *(["# ... the calls over each 8-bit KV format's cache over bf16's at the same setting "
               "(calibration.LOOP_KV_FORMAT_SETTING)",
               _kt("cpu_attention_loop_time_of_compute_by_kv_format", rt["cpu_attention_loop_time_of_compute_by_kv_format"])]
              if rt.get("cpu_attention_loop_time_of_compute_by_kv_format") else [])]


def profile_toml(result: dict, name: str, gpu_from: str | os.PathLike | HardwareProfile | None = None) -> str:
    """The text of a complete hardware profile from `profile_machine`'s result.

    Without a measured GPU, [gpu] and [link] (and the GPU curves of [measured]) come from `gpu_from`
    (a profile name, path, or HardwareProfile); with neither, ProbeError."""
    g, lk, c = result.get("gpu"), result.get("link"), result["cpu"]
    if g is None and gpu_from is None:
        raise ProbeError("no GPU was measured: the [gpu] and [link] sections cannot be written; "
                         "pass --gpu-from PROFILE to take them from an existing profile")
    donor = None
    if g is None:
        donor = gpu_from if isinstance(gpu_from, HardwareProfile) else load_profile(gpu_from)
    v, date = result["versions"], result["date"]
    device = f"{g['count']}x {g['name']}" if g else f"CPU {c['name']} (no GPU)"
    source = f"measured by moe-lightning profile on {date}, torch {v['torch']}, {device}"
    lines = [f"# Written by `moe-lightning profile` on {result.get('timestamp', date)} ({result.get('host', '')})"
             f"{' in quick mode' if result.get('quick') else ''}.",
             "# Units as in hrm/hardware_profiles/README.md: GB = 1e9 bytes, GiB = 2^30 bytes, TFLOP/s = 1e12 FLOP/s.",
             *[f"# note: {n}" for n in result.get("notes", [])],
             f"name = {_str(name)}"]
    desc = (f"{g['count']}x {g['name']}" if g else f"GPU from profile {donor.name!r}") + \
           f", {c['cores']} cores {c['name']}, {c['memory_bytes'] / GiB:.1f} GiB RAM (measured {date})"
    lines += [f"description = {_str(desc)}", ""]
    if g:
        best_bf16 = max([g["square_gemm_flops_per_s"]["bf16"], *g["gemm_flops_per_s"]])
        tflops = {"bf16": best_bf16, "fp16": g["square_gemm_flops_per_s"]["fp16"],
                  "fp32": g["square_gemm_flops_per_s"]["fp32"]}
        top = lk["sizes_bytes"].index(max(lk["sizes_bytes"]))
        h2d, d2h = lk["h2d_bytes_per_s"][top], lk["d2h_bytes_per_s"][top]
        lines += ["[gpu]", f"name = {_str(g['name'])}", f"count = {g['count']}",
                  "# torch.cuda.mem_get_info total",
                  _kv("memory_gib", g['memory_bytes']),
                  "# device copy, read + write bytes",
                  _kv("mem_gb_per_s", g['hbm_copy_bytes_per_s']),
                  f"# best measured GEMM: bf16 over {g['square_gemm_n']}^3 and the expert-shape sweep; fp16 and "
                  f"fp32 at {g['square_gemm_n']}^3 (TF32 {'on' if g.get('tf32_matmul') else 'off'})",
                  _kt("tflops", tflops),
                  f"source = {_str(source)}", "",
                  "[link]",
                  f"# pinned, {lk['sizes_bytes'][top] / MiB:g} MiB transfers",
                  _kv("h2d_gb_per_s", h2d), _kv("d2h_gb_per_s", d2h),
                  f"# both directions at once, {lk['duplex_size_bytes'] / MiB:g} MiB each (capped at h2d + d2h)",
                  _kv("duplex_gb_per_s", min(lk['duplex_bytes_per_s'], h2d + d2h)),
                  _kv("pageable_h2d_gb_per_s", lk['pageable_h2d_bytes_per_s']),
                  *([f"# GPU 0 -> GPU 1, {lk['peer_size_bytes'] / MiB:g} MiB (the tensor-parallel all-reduces' rate)",
                     _kv("peer_gb_per_s", lk['peer_bytes_per_s'])] if lk.get("peer_bytes_per_s") else []),
                  f"source = {_str(source)}", ""]
    else:
        lines += _gpu_section_from(donor) + [""]
    mm = c["matmul_flops_per_s"]
    lines += ["[cpu]", f"name = {_str(c['name'])}", f"cores = {c['cores']}",
              "# os.sysconf physical pages",
              _kv("memory_gib", c['memory_bytes']),
              f"# DRAM read (sum over {c['dram_size_bytes'] / MiB:g} MiB); copy: "
              f"{_num(c['dram_copy_bytes_per_s'] / unit_of('cpu_dram_copy_gb_per_s'))} GB/s read + write",
              _kv("mem_gb_per_s", c['dram_read_bytes_per_s']),
              f"# n^3 matmul, n = {c['matmul_n']['fp32']} (fp32) and {c['matmul_n']['bf16']} (bf16), "
              f"{c['torch_threads']} torch threads",
              _kt("tflops", {'bf16': mm['bf16'], 'fp32': mm['fp32']}),
              f"source = {_str(source)}", ""]

    lines += ["[measured]"]
    calib = ["[calibration]"]
    if g:
        lines += [f"# {g['gemm_shape']}", f"gpu_gemm_tokens = {_arr(g['gemm_tokens'])}",
                  _ka("gpu_gemm_tflops", g['gemm_flops_per_s']),
                  "# pinned, by transfer size",
                  _ka("h2d_sizes_mib", lk['sizes_bytes']),
                  _ka("h2d_gb_per_s", lk['h2d_bytes_per_s']),
                  _ka("d2h_sizes_mib", lk['sizes_bytes']),
                  _ka("d2h_gb_per_s", lk['d2h_bytes_per_s']),
                  _kv("gpu_hbm_gb_per_s", g['hbm_copy_bytes_per_s'])]
        if g.get("moe_shapes"):
            calib += ["# runtime.moe.moe, one MoE layer, every expert resident, at the expert shapes [hidden, "
                      f"intermediate, experts, top-k] of {', '.join(g['moe_models'])}: routed top-k FLOP/s by "
                      "tokens per expert",
                      f"gpu_moe_shapes = {json.dumps(g['moe_shapes'])}",
                      f"gpu_moe_tokens_per_expert = {json.dumps(g['moe_tokens_per_expert'])}",
                      _kcurves("gpu_moe_tflops", g["moe_flops_per_s"])]
        if g.get("prefill_tokens"):
            calib += [f"# runtime.Engine prefill of {g.get('prefill_model', 'the model')}, "
                      f"{PREFILL_WEIGHTS_GPU_FRAC:g} of the experts resident and the rest streamed, passes of "
                      f"{PREFILL_PASS_TOKENS} tokens, CPU attention, prompts of {g['prefill_prompt_len']}: "
                      f"per (layer, chunk) by tokens per chunk "
                      f"(slope over {g['prefill_layers']} layers) the layer's time less the routed experts' and "
                      "the dense FFN's (at the GEMM roofline), as FLOP/s of hrm.ops.prefill_rest ...",
                      f"gpu_prefill_tokens = {_arr(g['prefill_tokens'])}",
                      *([_ka("gpu_prefill_rest_tflops", g['prefill_rest_flops_per_s'])]
                        if g.get("prefill_rest_flops_per_s") else []),
                      "# ... and what it pays once per pass, whatever the layers, per prompt token",
                      f"prefill_pass_ns_per_token = {g['prefill_pass_s_per_token'] / unit_of('prefill_pass_ns_per_token'):.4g}"]
        if g.get("prefill_rest_by_shape"):
            rows = g["prefill_rest_by_shape"]
            calib += [f"# the rest rate of {', '.join(r['model'] for r in rows)} by attention shape [hidden, q_dim, "
                      "K+V elements per token] (hrm.rates.attention_shape)",
                      f"gpu_prefill_rest_shapes = {json.dumps([r['shape'] for r in rows])}",
                      f"gpu_prefill_rest_tokens_by_shape = {json.dumps([r['tokens'] for r in rows])}",
                      _kcurves("gpu_prefill_rest_tflops_by_shape", [r["rest_flops_per_s"] for r in rows])]
    elif donor.measured is not None:
        m = donor.measured
        lines.append(f"# GPU curves from profile {donor.name!r} ({m.method}, {m.date})")
        if m.gpu_gemm_tokens:
            lines += [f"gpu_gemm_tokens = {_arr(m.gpu_gemm_tokens)}",
                      _ka("gpu_gemm_tflops", m.gpu_gemm_flops_per_s)]
        if m.h2d_sizes_bytes:
            lines += [_ka("h2d_sizes_mib", m.h2d_sizes_bytes),
                      _ka("h2d_gb_per_s", m.h2d_bytes_per_s)]
        if m.gpu_hbm_bytes_per_s:
            lines.append(_kv("gpu_hbm_gb_per_s", m.gpu_hbm_bytes_per_s))
    lines += [_kv("cpu_dram_gb_per_s", c['dram_read_bytes_per_s']),
              _kv("cpu_dram_copy_gb_per_s", c['dram_copy_bytes_per_s'])]
    calib += [*_attention_kernel_lines(result),
              *([f"# runtime.Engine decode loop of {c['runtime']['visit_model']} with 16-wide experts, half streamed, "
                 "mu = 1, recording on: the host's fixed work per visit, by schedule",
                 _kv("decode_visit_us", c['runtime']['decode_visit_s']),
                 *([_kt("decode_visit_us_by_schedule", c['runtime']['decode_visit_s_by_schedule'])]
                   if c["runtime"].get("decode_visit_s_by_schedule") else []),
                 *([f"# the same with micro-batches of {c['runtime']['grouped_above_tokens'] + 1}: the grouped MoE path",
                    f"grouped_above_tokens = {c['runtime']['grouped_above_tokens']}",
                    _kt("decode_visit_us_grouped_by_schedule", c['runtime']['decode_visit_s_grouped_by_schedule'])]
                   if c["runtime"].get("decode_visit_s_grouped_by_schedule") else []),
                 *_attention_call_lines(c['runtime'])]
                if "runtime" in c else []),
              *_attention_loop_lines(c.get("runtime", {}))]
    method = "moe-lightning profile (runtime/probe/): torch micro-benchmarks, median of repeats" + \
             (", quick mode" if result.get("quick") else "") + \
             ("" if g else f"; no GPU here, [gpu] [link] and GPU curves from profile {donor.name!r}")
    lines += [f"method = {_str(method)}", f"date = {_str(date)}", f"model_shapes = {_str(result['shapes']['model'])}"]
    lines += [f"{k}_version = {_str(val)}" for k, val in v.items() if k != "git_commit"]
    lines += [f"git_commit = {_str(v.get('git_commit', ''))}", f"elapsed_s = {_num(result.get('elapsed_s', 1e-3))}", ""]
    lines += calib + [""]
    mem = result.get("memory")
    if mem:
        lines += ["[memory]",
                  "# a fresh runtime process (python -c, the runtime imported, CUDA up, one matmul): resident set, and the",
                  "# device memory it holds beyond torch's allocator; the allocator's reserved minus allocated peak per byte",
                  "# of the memory account's transient workspace,",
                  f"# over {mem['allocator_probe']}",
                  _kv("process_baseline_gib", mem['process_baseline_bytes'])]
        if g:
            lines += [f"cuda_context_gib = {mem['cuda_context_bytes'] / unit_of('cuda_context_gib'):.4g}",
                      f"gpu_allocator_frac = {max(mem['gpu_allocator_frac'], 0.0):.4g}"]
        lines += [f"source = {_str(source)}", ""]
    return "\n".join(lines)


def write_profile_toml(result: dict, path: str | os.PathLike, name: str | None = None,
                       gpu_from: str | os.PathLike | HardwareProfile | None = None) -> HardwareProfile:
    """Write the profile atomically (temporary file + os.replace) and return it as loaded.

    The text is parsed with hrm.hardware before anything is written, so a file on disk always loads."""
    path = Path(path)
    name = name or path.stem
    text = profile_toml(result, name, gpu_from)
    profile = parse_profile(tomllib.loads(text), name, str(path))
    atomic_write_text(path, text)
    return profile


def cpu_attention_lines(result: dict) -> dict[str, str]:
    """The `key = value` line profile_toml writes of each CPU_ATTENTION_KEYS key from `result`
    (profile_machine's or machine_profile.profile_cpu_attention's), by key; the keys it would not write
    (not measured) are absent."""
    rt = result["cpu"].get("runtime", {})
    lines = _attention_kernel_lines(result) + _attention_call_lines(rt) + _attention_loop_lines(rt)
    out = {line.split("=", 1)[0].strip(): line for line in lines if not line.startswith("#")}
    assert set(out) <= set(CPU_ATTENTION_KEYS), sorted(set(out) - set(CPU_ATTENTION_KEYS))
    return out


_REMEASURED = re.compile(r"; CPU attention re-measured [^;]*$")


def check_cpu_attention_base(text: str, where: str = "the base profile") -> dict:
    """The parsed TOML of a profile whose CPU attention update_cpu_attention can re-measure: one this
    machine measured, with [measured] and [calibration] (not a published one's); else ProbeError."""
    data = tomllib.loads(text)
    if not isinstance(data.get("calibration"), dict) or not isinstance(data.get("measured"), dict):
        raise ProbeError(f"{where} has no [measured] and [calibration] sections (it was not written by "
                         "`moe-lightning profile`): measure a whole profile instead")
    if str(data["measured"].get("method", "")).startswith("published"):
        raise ProbeError(f"{where} holds published measurements of another machine ([measured] method "
                         f"{data['measured']['method'][:40]!r}...): measure a whole profile instead")
    return data


def update_cpu_attention(text: str, result: dict, name: str | None = None) -> tuple[str, dict]:
    """A measured profile's TOML `text` with the CPU_ATTENTION_KEYS values of `result`
    (machine_profile.profile_cpu_attention's) in [calibration], each written as profile_toml writes it;
    without a measured GPU (result["gpu_measured"] false) CPU_ATTENTION_LOOP_KEYS stay as they were. A key
    that was measured but that profile_toml would not write from `result` (--quick measures one in-loop
    setting: no curve by micro-batch, no loop fit) is removed, so that no stale value of the old kernel
    stays beside the new ones; one the text lacks is added after the others. [measured]'s `method` gets
    "; CPU attention re-measured DATE (...)" (in place of an earlier such note), the top-level `name`
    becomes `name` where given and different. Every other line stays as it was, comments included.

    Returns (text, {"replaced", "added", "removed", "kept": keys}); ProbeError as check_cpu_attention_base."""
    data = check_cpu_attention_base(text)
    old = set(data["calibration"])
    new = cpu_attention_lines(result)
    measured = [k for k in CPU_ATTENTION_KEYS if result.get("gpu_measured") or k not in CPU_ATTENTION_LOOP_KEYS]
    out = replace_profile_keys(text, "calibration", {k: new.get(k) for k in measured})
    v = result["versions"]
    note = (f"; CPU attention re-measured {result['date']} (moe-lightning profile --only cpu-attention"
            f"{', quick mode' if result.get('quick') else ''}, torch {v['torch']}"
            f"{', git ' + v['git_commit'] if v.get('git_commit') else ''})")
    method = _REMEASURED.sub("", str(data["measured"].get("method", ""))) + note
    out = replace_profile_keys(out, "measured", {"method": f"method = {_str(method)}"})
    if name is not None and data.get("name") != name:
        out = replace_profile_keys(out, "", {"name": f"name = {_str(name)}"})
    changes = {"replaced": [k for k in measured if k in new and k in old],
               "added": [k for k in measured if k in new and k not in old],
               "removed": [k for k in measured if k not in new and k in old],
               "kept": [k for k in CPU_ATTENTION_KEYS if k not in measured and k in old]}
    return out, changes


def read_profile_text(path: str | os.PathLike) -> str:
    """A profile file's text with its line endings as they are (update_cpu_attention keeps them)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def write_cpu_attention_update(result: dict, text: str, path: str | os.PathLike,
                               name: str | None = None) -> tuple[HardwareProfile, dict]:
    """update_cpu_attention on a base profile's `text`, written to `path` atomically (temporary file +
    os.replace) once the new text loads with hrm.hardware; (the profile as loaded, the changes)."""
    path = Path(path)
    new, changes = update_cpu_attention(text, result, name or path.stem)
    profile = parse_profile(tomllib.loads(new), name or path.stem, str(path))
    atomic_write_text(path, new)
    return profile, changes
