"""Checks every input boundary shares (config, profile, plan, prompts, CLI values): numbers that are
finite, in range and of the right type; JSON without NaN, Infinity or unbounded nesting; dataclasses built
from JSON with known keys only and every field of its annotated type. Each error is one line naming where
(file and key) and the value. Stdlib only.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import types
import typing
from pathlib import Path

MAX_INT = 2 ** 31 - 1
"""The largest count any field takes (layers, widths, vocabulary, positions, sequences, tokens)."""
MAX_BYTES = 2.0 ** 60
"""The largest memory size any input states (1 EiB)."""


def number(value, where: str, *, err=ValueError, integer: bool = False, positive: bool = False,
           low: float = 0.0, high: float | None = None):
    """`value` as an int or float: not a bool or a string, finite, at least `low` (above 0 when
    `positive`), at most `high` (MAX_INT for integers)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise err(f"{where} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise err(f"{where} must be a finite number, got {value!r}")
    high = MAX_INT if high is None and integer else high
    if positive and not value > 0:
        raise err(f"{where} must be positive, got {value!r}")
    if value < low:
        raise err(f"{where} must be at least {low:g}, got {value!r}")
    if high is not None and value > high:
        raise err(f"{where} must be at most {high:g}, got {value!r}")
    return int(value) if integer else float(value)


def one_line(e) -> str:
    return " ".join(str(e).split())


def read_text(path, what: str, err=ValueError) -> str:
    """A text file's contents; a missing, unreadable, non-UTF-8 file or a directory is one `err`."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise err(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise err(f"{what} {p} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise err(f"{what} {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise err(f"cannot read {what} {p}: {e.strerror or one_line(e)}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json(text: str, where: str, err=ValueError):
    """Parse JSON text; NaN / Infinity, nesting too deep for the parser and syntax errors are one `err`
    naming `where` (and the line and column)."""
    if not text.strip():
        raise err(f"{where}: empty file, expected JSON")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise err(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise err(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:
        raise err(f"{where}: {one_line(e)}") from None


def need(value, kind, where: str, err=ValueError):
    """`value` if it is a `kind` (dict: a JSON object, list: an array), else one `err`."""
    if not isinstance(value, kind):
        name = {dict: "a JSON object", list: "a list"}.get(kind, kind.__name__)
        raise err(f"{where} must be {name}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def typed(cls, data, where: str, err=ValueError, *, skip=()):
    """cls(**data) for a dataclass, each field checked against its annotation: numbers finite and not
    negative (ints integers), strings, bools, nested dataclasses, tuples and mappings of those; unknown
    keys refused. Fields in `skip` are passed through as they are."""
    data = need(data, dict, where, err)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        known = f"; known: {', '.join(sorted(names))}" if len(names) <= 12 else ""
        raise err(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}{known}")
    kw = {k: v if k in skip else coerce(hints[k], v, f"{where}.{k}", err) for k, v in data.items()}
    try:
        return cls(**kw)
    except TypeError as e:                 # a required field missing
        raise err(f"{where}: {one_line(e).split(') ', 1)[-1]}") from None


def coerce(tp, v, where: str, err):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return coerce(tp, v, where, err)
    if tp is bool:
        if not isinstance(v, bool):
            raise err(f"{where} must be true or false, got {_short(v)}")
        return v
    if tp in (int, float):
        return number(v, where, err=err, integer=tp is int, high=None if tp is float else MAX_INT)
    if tp is str:
        if not isinstance(v, str):
            raise err(f"{where} must be a string, got {_short(v)}")
        return v
    if dataclasses.is_dataclass(tp):
        return typed(tp, v, where, err)
    if origin is tuple:
        v = need(v, list, where, err) if not isinstance(v, tuple) else v
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], x, f"{where}[{i}]", err) for i, x in enumerate(v))
        if len(v) != len(args):
            raise err(f"{where} must have {len(args)} entries, got {len(v)}")
        return tuple(coerce(a, x, f"{where}[{i}]", err) for i, (a, x) in enumerate(zip(args, v)))
    if origin in (dict, collections.abc.Mapping):
        v = need(v, dict, where, err)
        return {str(k): coerce(args[1], x, f"{where}.{k}", err) for k, x in v.items()}
    return v


def check_context(spec, longest_prompt: int, gen_len: int, err=ValueError) -> None:
    """The longest prompt and the tokens generated after it fit the model's max_position_embeddings."""
    total = int(longest_prompt) + int(gen_len)
    if total > spec.max_position_embeddings:
        raise err(f"a context of {total} tokens ({longest_prompt} prompt + {gen_len} generated) exceeds "
                  f"{spec.name}'s max_position_embeddings {spec.max_position_embeddings}")
