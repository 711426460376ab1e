"""One request's generation state as the scheduler, block manager and engine see it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks (new, or preempted for recompute)
    RUNNING = "running"  # holds blocks, scheduled every step
    SWAPPED = "swapped"  # preempted, its KV blocks copied to host memory
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens (prompt then output), how many of them have KV in the cache, and the blocks holding it.

    ``num_computed_tokens`` counts the leading tokens whose keys and values are in the cache; the
    tokens past it are what the next forward has to process (a prefill chunk, or the last sampled
    token when decoding).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    deadline: float | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks registered in (or taken from) the prefix cache
    num_prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: Any = None  # torch.Generator for a seeded request
    first_token_time: float | None = None
    last_token_time: float | None = None
    swapped_kv: Any = None  # host copy of the KV blocks while SWAPPED
    swapped_kv_blocks: int = 0
    detok: Any = None  # incremental detokenizer state (engine)
    index: int = 0  # which choice of its request (n > 1)
    text_sent: int = 0  # characters of the text already handed out
    stop_reason: str | int | None = None
    max_tokens: int = 0  # params.max_tokens capped by the context length
    admitted: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
