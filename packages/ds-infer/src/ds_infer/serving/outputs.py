"""What the engine hands back: per-step updates and per-request results (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "RequestOutput", "SequenceUpdate"]


@dataclass
class CompletionOutput:
    """One choice of a request: its text and tokens so far, and why it stopped (None while running).

    ``finish_reason``: ``"stop"`` (EOS, a stop token or a stop string; ``stop_reason`` says which
    string or token id, None for EOS), ``"length"`` (max_tokens or the context length),
    ``"abort"`` (cancelled) or ``"timeout"``.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its choices (``outputs``, one per ``n``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class SequenceUpdate:
    """What one choice of one request gained in a step (streaming reads these)."""

    request_id: str
    index: int
    text_delta: str
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
