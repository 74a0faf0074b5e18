"""`moe-lightning profile`: measure this machine and write a hardware profile (runtime/probe/)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import DEFAULT_MODEL, print_json

ONLY = ("cpu-attention",)       # the parts --only re-measures (runtime.probe.CPU_ATTENTION_KEYS)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure this machine (GEMM, HBM, link, DRAM, CPU attention) and write a profile",
        description="Measure this machine with micro-benchmarks: GPU GEMM at decode and prefill shapes, HBM, "
                    "pinned H2D/D2H by size, both directions at once, pageable H2D, CPU DRAM, CPU matmul and "
                    "the runtime's CPU decode attention. Writes a hardware profile TOML with -o. With --only "
                    "cpu-attention --base OLD.toml -o NEW.toml: re-measure only the CPU decode attention (the "
                    "kernel by shape, one call's cost and, with a CUDA GPU, its calls inside the decode loop) "
                    "and write OLD.toml with just those values replaced.")
    p.add_argument("-o", "--output", metavar="PROFILE.toml",
                   help="write the profile here (e.g. hrm/hardware_profiles/NAME.toml)")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds; for smoke tests)")
    p.add_argument("--gpu-from", metavar="PROFILE",
                   help="without a GPU here: take [gpu] and [link] from this profile (name or .toml path)")
    p.add_argument("--model", help=f"model whose GEMM and attention shapes are measured (default {DEFAULT_MODEL}; "
                                   "with --only, the base's model_shapes)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON only (SI units)")
    p.add_argument("--upgrade", metavar="OLD.toml",
                   help="measure nothing: rewrite a profile written before 2026-12-02 (the runtime's calibrations "
                        "in [measured]) with them in [calibration], to -o or in place")
    p.add_argument("--only", choices=ONLY,
                   help="re-measure only this part (cpu-attention: the [calibration] keys of the runtime's CPU "
                        "decode attention; the in-loop ones need a CUDA GPU, else they stay) and write --base "
                        "with just those values replaced, to -o (required; -o OLD.toml to replace it)")
    p.add_argument("--base", metavar="OLD.toml",
                   help="with --only: the profile (path or name) whose other values, comments and order are kept")


def run(args) -> int:
    if args.only or args.base:
        return _only(args)
    if args.upgrade:
        return _upgrade(args.upgrade, args.output or args.upgrade)
    import torch

    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from runtime.probe import ProbeError, profile_machine, write_profile_toml

    has_gpu = torch.cuda.is_available()
    donor = None
    if not has_gpu:
        if not args.gpu_from:
            raise ProbeError("no CUDA GPU here, so [gpu] and [link] cannot be measured; "
                           "pass --gpu-from PROFILE to take them from an existing profile")
        donor = load_profile(args.gpu_from)           # fail before measuring anything
    elif args.gpu_from:
        print(f"moe-lightning profile: --gpu-from {args.gpu_from} ignored: this machine's GPU is measured",
              file=sys.stderr)
    spec = load_model(args.model or DEFAULT_MODEL)
    result = profile_machine(spec, quick=args.quick, progress=not args.no_progress)
    profile = None
    if args.output:
        profile = write_profile_toml(result, args.output, args.name or Path(args.output).stem, gpu_from=donor)
        result["profile_path"] = str(args.output)
    if args.json:
        print_json(result)
        return 0
    _print(result, donor, profile, args.output)
    return 0


def _only(args) -> int:
    """--only cpu-attention: every input checked before anything is measured, the output written atomically
    after every measurement succeeded."""
    from hrm.atomic import check_writable
    from hrm.hardware import load_profile
    from hrm.hf_config import load_model
    from runtime.probe import (check_cpu_attention_base, profile_cpu_attention, read_profile_text,
                               write_cpu_attention_update)

    from .main import CLIError
    if not args.only:
        raise CLIError("--base goes with --only (e.g. --only cpu-attention --base OLD.toml -o NEW.toml)")
    for flag, given in (("--upgrade", args.upgrade), ("--gpu-from", args.gpu_from)):
        if given:
            raise CLIError(f"--only does not go with {flag} (--only keeps every other value of --base)")
    if not args.base:
        raise CLIError(f"--only {args.only} needs --base OLD.toml: the profile whose other values are kept")
    if not args.output:
        raise CLIError(f"--only {args.only} needs -o NEW.toml (-o {args.base} replaces the base)")
    base = load_profile(args.base)                      # a missing, unparseable or invalid base: one line
    text = read_profile_text(base.path)
    data = check_cpu_attention_base(text, base.path)
    check_writable(args.output)
    recorded = data["measured"].get("model_shapes")
    spec = load_model(args.model or recorded or DEFAULT_MODEL)
    if recorded and spec.name != recorded:
        raise CLIError(f"--model {args.model}: the base's figures were measured at {recorded}'s shapes "
                       f"(its model_shapes); leave --model out or measure a whole profile")
    result = profile_cpu_attention(spec, quick=args.quick, progress=not args.no_progress)
    profile, changes = write_cpu_attention_update(result, text, args.output, args.name)
    result.update(base_path=base.path, profile_path=str(args.output), changes=changes)
    if args.json:
        print_json(result)
        return 0
    head = (f"moe-lightning profile --only {args.only} on {result['host']} ({result['date']}, torch "
            f"{result['versions']['torch']}{', quick mode' if result['quick'] else ''}), shapes of "
            f"{result['shapes']['model']}, {result['elapsed_s']:.1f} s")
    done = [f"{what} {', '.join(keys)}" for what, keys in changes.items() if keys]
    tail = (f"wrote {args.output} (profile {profile.name!r}): {base.path} with {'; '.join(done)}; "
            f"[measured] method notes the re-measurement")
    _table(head, result["notes"], _kernel_rows(result) + _call_and_loop_rows(result["cpu"]["runtime"]), tail)
    return 0


def _upgrade(src: str, dst: str) -> int:
    """Move an old profile's calibrations into [calibration]; the text is parsed before anything is
    written, and written atomically."""
    import tomllib

    from hrm.atomic import atomic_write_text
    from hrm.checks import read_text
    from hrm.hardware import HardwareError, parse_profile
    from hrm.profile_keys import upgrade_profile_text

    text = read_text(src, "hardware profile", HardwareError)
    new = upgrade_profile_text(text)
    try:
        parse_profile(tomllib.loads(new), Path(dst).stem, dst)
    except tomllib.TOMLDecodeError as e:
        raise HardwareError(f"{src}: not valid TOML ({e})") from None
    if new == text and dst == src:
        print(f"{src}: nothing to upgrade")
        return 0
    atomic_write_text(Path(dst), new)
    print(f"wrote {dst} (the runtime's calibrations in [calibration])")
    return 0


def _print(r: dict, donor, profile, output) -> None:
    """A table of the measurements (rich; plain lines where rich is not installed)."""
    c, g, lk = r["cpu"], r["gpu"], r["link"]
    rows: list[tuple[str, str, str]] = []
    if g:
        rows.append(("GPU", f"{g['count']}x {g['name']} (sm {g['capability']})", f"{g['memory_bytes'] / 2**30:,.2f} GiB"))
        for tok, f in zip(g["gemm_tokens"], g["gemm_flops_per_s"]):
            rows.append(("", f"GEMM {g['gemm_shape'].replace('tokens', str(tok))}", f"{f / 1e12:,.1f} TFLOP/s"))
        for dt, f in g["square_gemm_flops_per_s"].items():
            rows.append(("", f"GEMM {g['square_gemm_n']}^3 {dt}", f"{f / 1e12:,.1f} TFLOP/s"))
        rows.append(("", f"HBM copy {_size(g['hbm_copy_size_bytes'])} (read + write)",
                     f"{g['hbm_copy_bytes_per_s'] / 1e9:,.0f} GB/s"))
        for size, up, down in zip(lk["sizes_bytes"], lk["h2d_bytes_per_s"], lk["d2h_bytes_per_s"]):
            rows.append(("link", f"pinned {_size(size)}: H2D / D2H", f"{up / 1e9:,.1f} / {down / 1e9:,.1f} GB/s"))
        rows.append(("", f"H2D + D2H at once, {_size(lk['duplex_size_bytes'])} each (total)",
                     f"{lk['duplex_bytes_per_s'] / 1e9:,.1f} GB/s"))
        rows.append(("", f"pageable H2D {_size(lk['pageable_size_bytes'])}",
                     f"{lk['pageable_h2d_bytes_per_s'] / 1e9:,.1f} GB/s"))
    rows.append(("CPU", f"{c['name']}, {c['cores']} cores, {c['torch_threads']} torch threads",
                 f"{c['memory_bytes'] / 2**30:,.1f} GiB"))
    rows.append(("", f"DRAM copy {_size(c['dram_size_bytes'])} (read + write)", f"{c['dram_copy_bytes_per_s'] / 1e9:,.1f} GB/s"))
    rows.append(("", f"DRAM read {_size(c['dram_size_bytes'])}", f"{c['dram_read_bytes_per_s'] / 1e9:,.1f} GB/s"))
    for dt, f in c["matmul_flops_per_s"].items():
        rows.append(("", f"matmul {c['matmul_n'][dt]}^3 {dt}", f"{f / 1e12:,.3f} TFLOP/s"))
    rows += _kernel_rows(r)
    if "runtime" in c:
        rt = c["runtime"]
        rows.append(("runtime", f"decode visit (one micro-batch, one layer), {rt['visit_model']}",
                     f"{rt['decode_visit_s'] * 1e6:,.0f} us"))
        for sched, sec in rt.get("decode_visit_s_by_schedule", {}).items():
            rows.append(("", f"  {sched}, micro-batches of 1", f"{sec * 1e6:,.0f} us"))
        for sched, sec in rt.get("decode_visit_s_grouped_by_schedule", {}).items():
            rows.append(("", f"  {sched}, micro-batches of {rt['grouped_above_tokens'] + 1} (grouped MoE)",
                         f"{sec * 1e6:,.0f} us"))
        rows += _call_and_loop_rows(rt)
    if g and g.get("moe_shapes"):
        for i, (name, curve_x, curve_y) in enumerate(zip(g["moe_models"], g["moe_tokens_per_expert"],
                                                         g["moe_flops_per_s"])):
            rates = ", ".join(f"{f / 1e12:,.0f}" for f in curve_y)
            rows.append(("GPU" if i == 0 else "", f"runtime MoE layer at {name}'s shape, tokens per expert "
                         f"{', '.join(f'{x:g}' for x in curve_x)}", f"{rates} TFLOP/s"))
    if g and g.get("prefill_tokens"):
        rest = g.get("prefill_rest_flops_per_s") or [None] * len(g["prefill_tokens"])
        for tok, f, r_f in zip(g["prefill_tokens"], g["prefill_flops_per_s"], rest):
            rows.append(("", f"runtime prefill layer, {tok} tokens in prompts of {g['prefill_prompt_len']}"
                         + ("" if r_f is None else f" (all but the experts: {r_f / 1e12:,.1f})"),
                         f"{f / 1e12:,.1f} TFLOP/s"))
        rows.append(("", "runtime prefill, once per pass", f"{g['prefill_pass_s_per_token'] * 1e9:,.0f} ns/token"))

    head = (f"moe-lightning profile on {r['host']} ({r['date']}, torch {r['versions']['torch']}"
            f"{', quick mode' if r['quick'] else ''}), shapes of {r['shapes']['model']}, {r['elapsed_s']:.1f} s")
    notes = [n + (f"; taken from profile {donor.name!r}" if donor else "") for n in r["notes"]]
    tail = f"wrote {output} (profile {profile.name!r}; use it with --hardware {output})" if profile else ""
    _table(head, notes, rows, tail)


def _kernel_rows(r: dict) -> list[tuple[str, str, str]]:
    """The table's rows of the runtime's CPU decode attention kernel alone, by shape."""
    a, s = r["cpu"]["attention"], r["shapes"]
    return [("", f"decode attention batch {batch} x ctx {ctx}, {s['num_attention_heads']}/"
                 f"{s['num_key_value_heads']} heads, d {s['head_dim']}, {a['dtype']} KV", f"{rate / 1e9:,.1f} GB/s")
            for (batch, ctx), rate in zip(a["shapes"], a["kv_bytes_per_s"])] + \
        [("", f"  kernel: {a['kernel']} ({a['threads']} threads)", "")] + \
        [("", f"  {fmt} KV cache, batch {' x ctx '.join(map(str, a['kv_format_shape']))}: time over bf16's",
          f"{ratio:.3f}x") for fmt, ratio in a.get("time_of_compute_by_kv_format", {}).items()]


def _call_and_loop_rows(rt: dict) -> list[tuple[str, str, str]]:
    """... one call's fixed cost, and its calls inside the CGOPipe loop where measured (with CUDA)."""
    rows = [("", "CPU attention call overhead", f"{rt['cpu_attention_call_s'] * 1e6:,.0f} us")] \
        if "cpu_attention_call_s" in rt else []
    if rt.get("cpu_attention_overlapped_bytes_per_s"):
        b, ctx = rt["overlap_shape"]
        sizes = rt.get("cpu_attention_overlapped_micro_batches") or [b]
        rates = rt.get("cpu_attention_overlapped_bytes_per_s_by_micro_batch") or [rt["cpu_attention_overlapped_bytes_per_s"]]
        for size, rate in zip(sizes, rates):
            rows.append(("", f"decode attention inside the CGOPipe loop, batch {size} x ctx {ctx}",
                         f"{rate / 1e9:,.1f} GB/s"))
    return rows


def _table(head: str, notes: list[str], rows: list[tuple[str, str, str]], tail: str) -> None:
    """The heading, notes, a table of (part, measurement, value) and a last line (rich where installed)."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        width = max(len(m) for _, m, _ in rows)
        print("\n".join([head, *notes] + [f"{p:5} {m:{width}}  {v}" for p, m, v in rows] + ([tail] if tail else [])))
        return
    con = Console()
    con.print(f"[bold]{escape(head)}[/]")
    for note in notes:
        con.print(f"[yellow]{escape(note)}[/]")
    t = Table(title="measured", title_justify="left")
    t.add_column("part")
    t.add_column("measurement")
    t.add_column("value", justify="right")
    for cells in rows:
        t.add_row(*(escape(x) for x in cells))          # names and shapes hold [brackets]
    con.print(t)
    if tail:
        con.print(escape(tail))


def _size(n: float) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"
