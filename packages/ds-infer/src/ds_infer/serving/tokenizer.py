"""Tokenizer handling: ``AutoTokenizer`` from the model directory, chat templates, and incremental
detokenization with stop strings.

Streaming text token by token is subtle: one character may span several byte-level tokens, and
SentencePiece-style decoders drop or add a leading space depending on where decoding starts.
:class:`IncrementalDetokenizer` therefore decodes a short window twice — the tokens already shown
(``prefix_offset .. read_offset``) and the same plus the new ones — and emits the difference only
when it does not end in an incomplete character (U+FFFD); the window then slides forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .sampling_params import RequestError

__all__ = ["load_tokenizer", "render_chat", "IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


def load_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` of the tokenizer directory (default: the model directory)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the serve extra brings it
        raise ImportError("serving needs transformers for the tokenizer: pip install 'ds-infer[serve]'") from exc
    path = Path(tokenizer or model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no tokenizer in {path} ({exc}); save one beside the model with "
                                "tokenizer.save_pretrained(dir) or pass tokenizer=DIR") from exc


def render_chat(tokenizer, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                chat_template: str | None = None, **template_kwargs: Any) -> str:  # fmt: skip
    """The prompt text of a chat, through the tokenizer's chat template (or ``chat_template``)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages", "this model's tokenizer has no chat template (tokenizer_config.json has "
                                       "no 'chat_template'); use /v1/completions or start the server with "
                                       "--chat-template FILE")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **template_kwargs)  # fmt: skip
    except Exception as exc:  # a template error is about the messages the client sent
        raise RequestError("messages", f"the chat template failed on these messages: {exc}") from exc


class IncrementalDetokenizer:
    """Text of one request's output tokens, grown token by token; watches for stop strings."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, stop: tuple[str, ...] = (),
                 include_stop_str_in_output: bool = False) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.tokens: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_reason: str | None = None
        self._max_stop = max((len(s) for s in stop), default=0)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)  # fmt: skip

    def add(self, token: int, check_stop: bool = True) -> bool:
        """Append one token; True when a stop string has now appeared (the text is cut there).
        ``check_stop=False`` (before ``min_tokens``) lets stop strings pass."""
        self.tokens.append(token)
        return self._advance(final=False, check_stop=check_stop)

    def finish(self) -> None:
        """Flush what the window held back (an incomplete character at the very end)."""
        if self.stop_reason is None:
            self._advance(final=True, check_stop=False)

    def _advance(self, final: bool, check_stop: bool) -> bool:
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return False  # nothing printable yet (e.g. half a character)
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        searched_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += delta
        if self.stop and check_stop:
            return self._check_stop(searched_from)
        return False

    def _check_stop(self, start: int) -> bool:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
        self.stop_reason = stop
        return True

    def safe_length(self, finished: bool) -> int:
        """How much of :attr:`text` can be streamed: all when finished, else all but what could still
        turn out to be the start of a stop string."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - self._max_stop + 1)
