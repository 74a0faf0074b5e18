"""Text in and out: the model directory's tokenizer (transformers, local files only), its chat template,
its end-of-sequence tokens, and where a generated sequence ends."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .requests import Completion, Request, RequestError


class TokenizerError(ValueError):
    """No usable tokenizer in the model directory."""


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    return d if isinstance(d, dict) else {}


def eos_token_ids(model_dir: str | Path, tokenizer=None) -> frozenset[int]:
    """Every token that ends a sequence: generation_config.json's eos_token_id (an id or a list), else
    config.json's, and the tokenizer's eos token."""
    d = Path(model_dir)
    ids = _ids(_json(d / "generation_config.json").get("eos_token_id")) or _ids(_json(d / "config.json").get("eos_token_id"))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass
class TextCodec:
    """A tokenizer with the model's end-of-sequence ids."""
    tokenizer: object              # transformers.PreTrainedTokenizerBase
    eos_ids: frozenset[int]

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "TextCodec":
        d = Path(model_dir)
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise TokenizerError(f"{d}: no tokenizer (tokenizer.json or tokenizer_config.json)")
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise TokenizerError(f"{d}: cannot load the tokenizer: {' '.join(str(e).split())}") from None
        return cls(tok, eos_token_ids(d, tok))

    def encode(self, request: Request) -> list[int]:
        """The prompt's token ids: the text with the tokenizer's special tokens (BOS), or the messages through
        the chat template with the assistant's turn opened (the template writes its own special tokens)."""
        tok = self.tokenizer
        if request.prompt is not None:
            ids = tok(request.prompt, add_special_tokens=True)["input_ids"]
        else:
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"request {request.id!r}: 'messages' needs a chat template and the tokenizer "
                                   "has none (give 'prompt' instead)")
            try:
                text = tok.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
            except Exception as e:        # jinja2 errors, the template's own raise_exception
                raise RequestError(f"request {request.id!r}: the chat template failed: "
                                   f"{' '.join(str(e).split())}") from None
            ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError(f"request {request.id!r}: the prompt has no tokens")
        return list(ids)

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def finish(self, request: Request, prompt_len: int, generated: list[int]) -> Completion:
        """The completion of `generated` (max_tokens or more tokens): cut at the first end-of-sequence token
        (kept in token_ids, not in the text), at the first stop string (neither kept in the text; token_ids
        up to the token that completed it), else at max_tokens."""
        tokens = list(generated[:request.params.max_tokens])
        reason = "length"
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                tokens, reason = tokens[:i + 1], "stop"
                break
        body = tokens[:-1] if reason == "stop" else tokens
        text = self.decode(body)
        cut = _first_stop(text, request.params.stop)
        if cut is not None:
            # the shortest prefix of tokens whose text holds the stop string
            k = next(k for k in range(1, len(body) + 1) if _first_stop(self.decode(body[:k]), request.params.stop) is not None)
            tokens, reason, text = body[:k], "stop", text[:cut]
        return Completion(request.id, text, tuple(int(t) for t in tokens), reason, prompt_len, len(tokens))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
