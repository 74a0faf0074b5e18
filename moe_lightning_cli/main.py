"""`moe-lightning`: one console script, one subcommand per job.

Each subcommand module exposes `add_parser(subparsers)` and `run(args) -> int`. Heavy imports (torch)
happen inside `run`, so `plan` and `estimate` stay fast.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from hrm.atomic import OutputError

SUBCOMMANDS = ("plan", "estimate", "run", "generate", "profile")   # each a module of this package


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class UsageError(CLIError):
    """A command line argparse cannot read."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage itself is in --help)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = Parser(
        prog="moe-lightning",
        description="High-throughput MoE inference on memory-constrained GPUs: predict (HRM), plan (policy "
                    "search) and run (CGOPipe runtime).")
    parser.add_argument("--version", action="version", version=f"moe-lightning {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"moe_lightning_cli.{name}")
        module.add_parser(sub)
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show the traceback of an error")
        modules[name] = module
    return parser, modules


def _version() -> str:
    from optimizer.plan import toolkit_version
    return toolkit_version()


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. No exception reaches the user as a traceback (--debug shows it): a bad input is
    one line on stderr and exit 2, an interrupt exit 130, a closed stdout a quiet exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = "moe-lightning"
    try:
        parser, modules = build_parser()
        args = parser.parse_args(argv or ["plan"])          # no arguments: the built-in default job
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        command = f"moe-lightning {args.command}"
        code = int(modules[args.command].run(args) or 0)
        sys.stdout.flush()
        return code
    except SystemExit as e:                                  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:       # noqa: BLE001: the one place every error becomes a line
        if debug and not isinstance(e, BrokenPipeError):
            raise
        return _report(command, e)


def _report(command: str, e: BaseException) -> int:
    """One line on stderr for `e`; the exit code."""
    from hrm.checks import one_line

    if isinstance(e, KeyboardInterrupt):
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    _silence_stdout()
    if isinstance(e, OSError) and e.errno == errno.EPIPE:    # stdout closed early (| head): end quietly
        return 141
    if isinstance(e, UsageError):
        command, text = e.args[1], e.args[0]
    elif isinstance(e, OSError) and not isinstance(e, OutputError):
        reason = e.strerror or one_line(e)
        text = f"{e.filename}: {reason}" if e.filename else f"cannot write stdout: {reason}" \
            if e.errno in (errno.ENOSPC, errno.EIO, errno.EBADF) else reason
    elif isinstance(e, RecursionError):
        text = "input nested too deeply"
    elif isinstance(e, (CLIError, ValueError, OSError, MemoryError)):
        text = one_line(e) or type(e).__name__
    else:
        print(f"{command}: internal error ({type(e).__name__}: {one_line(e)}); run with --debug for the "
              f"traceback", file=sys.stderr)
        return 1
    print(f"{command}: error: {one_line(text)}", file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush of a closed or full stdout is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
