"""Per-request sampling parameters, in the shape vLLM and the OpenAI API use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ds_core.errors import DSError

__all__ = ["SamplingParams", "RequestError"]


class RequestError(DSError, ValueError):
    """A request (its prompt or sampling parameters) breaks a rule; ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature=0`` is greedy decoding. ``top_k <= 0`` and ``top_p = 1`` disable those filters.
    ``repetition_penalty`` follows CTRL / Hugging Face (divide positive logits of tokens already in the
    prompt or output, multiply negative ones); ``presence_penalty`` / ``frequency_penalty`` follow the
    OpenAI API (subtract per generated occurrence). ``seed`` makes one request's samples reproducible
    whatever else is batched with it. Generation stops at ``max_tokens`` (None: the context length),
    at EOS (unless ``ignore_eos``), at any of ``stop_token_ids``, or when the text contains one of
    ``stop`` (cut before it unless ``include_stop_str_in_output``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> RequestError:
            return RequestError(name, f"{name}={getattr(self, name)!r} {rule}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return value

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            return value

        if integer("n") < 1:
            raise bad("n", "must be >= 1")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]; 1 disables it")
        integer("top_k")
        if self.top_k < 0:
            self.top_k = 0  # vLLM's -1 and OpenAI-style 0 both mean "disabled"
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.seed is not None:
            integer("seed")
        if self.max_tokens is not None and integer("max_tokens") < 1:
            raise bad("max_tokens", "must be >= 1 (or None for as many as the context allows)")
        if integer("min_tokens") < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        self.stop_strings = tuple(stop)
        ids = self.stop_token_ids or []
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of an ``n > 1`` request (one sample each, own seed)."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
