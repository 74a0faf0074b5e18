"""Requests of an offline batch job and what comes back for each.

A request file is JSON Lines, one object per line:

    {"id": "q1", "prompt": "Once upon a time", "max_tokens": 64, "stop": ["\\n\\n"]}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7, "top_p": 0.9}

`prompt` is text as it is; `messages` go through the model's chat template. The sampling fields are
optional and default to the job's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop")
REQUEST_FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)
FINISH_REASONS = ("stop", "length")


class RequestError(ValueError):
    """A request that cannot be run (the message names the line or the id, and the field)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128               # new tokens at most
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()          # strings that end the text (not included in it)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def sampling_key(self) -> tuple[float, float]:
        """Requests with the same key can share an engine pass (one temperature and top-p per pass)."""
        return (float(self.temperature), float(self.top_p))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str | None = None
    messages: tuple = ()                 # chat messages ({"role", "content"} dicts) when prompt is None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if (self.prompt is None) == (not self.messages):
            raise RequestError(f"request {self.id!r}: give exactly one of 'prompt' and 'messages'")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestError(f"request {self.id!r}: 'prompt' must be a string")
        for m in self.messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise RequestError(f"request {self.id!r}: each message needs a 'role' and a 'content'")

    @classmethod
    def from_dict(cls, d, defaults: SamplingParams = SamplingParams()) -> "Request":
        if not isinstance(d, dict):
            raise RequestError(f"expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r} (known: {', '.join(REQUEST_FIELDS)})")
        rid = d.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise RequestError("'id' must be a non-empty string or an integer")
        if ("prompt" in d) == ("messages" in d):
            raise RequestError(f"request {rid!r}: give exactly one of 'prompt' and 'messages'")
        messages = d.get("messages", ())
        if not isinstance(messages, (list, tuple)):
            raise RequestError(f"request {rid!r}: 'messages' must be a list")
        try:
            params = replace(defaults, **{k: d[k] for k in SAMPLING_FIELDS if k in d})
        except RequestError as e:
            raise RequestError(f"request {rid!r}: {e}") from None
        return cls(str(rid), d.get("prompt"), tuple(messages), params)


@dataclass(frozen=True)
class Completion:
    id: str
    text: str
    token_ids: tuple[int, ...]          # generated tokens, the end-of-sequence token included when it ended it
    finish_reason: str                  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_ids"] = list(self.token_ids)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Completion":
        return cls(str(d["id"]), d["text"], tuple(d["token_ids"]), d["finish_reason"], int(d["prompt_tokens"]),
                   int(d["completion_tokens"]))


def read_requests(path: str | Path, defaults: SamplingParams = SamplingParams()) -> list[Request]:
    """Every request of a JSONL file, in order; ids must be unique. Blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestError(f"request file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read request file {path}: {e}") from None
    out, seen = [], {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            req = Request.from_dict(json.loads(line), defaults)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{no}: not valid JSON ({e.msg})") from None
        except RequestError as e:
            raise RequestError(f"{path}:{no}: {e}") from None
        if req.id in seen:
            raise RequestError(f"{path}:{no}: id {req.id!r} repeats line {seen[req.id]}")
        seen[req.id] = no
        out.append(req)
    if not out:
        raise RequestError(f"{path}: no requests")
    return out
