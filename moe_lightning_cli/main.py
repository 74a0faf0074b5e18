"""`moe-lightning`: one console script, one subcommand per job.

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. Heavy imports (torch)
happen inside `run`, so `plan` and `estimate` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("plan", "estimate", "run", "generate", "profile", "validate")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="moe-lightning",
        description="High-throughput MoE inference on memory-constrained GPUs: predict (HRM), plan (policy "
                    "search) and run (CGOPipe runtime).")
    parser.add_argument("--version", action="version", version=f"moe-lightning {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"moe_lightning_cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"moe_lightning_cli.{name}":
                continue
            raise
        module.add_parser(sub)
        modules[name] = module
    return parser, modules


def _version() -> str:
    from optimizer.plan import toolkit_version
    return toolkit_version()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    if not argv:
        argv = ["plan"]          # the built-in default job
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("moe-lightning: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, MemoryError) as e:
        print(f"moe-lightning {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
