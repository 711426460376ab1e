"""Serving configuration: one typed model shared by the offline ``LLM``, the engine and ``ds serve``.

Every knob has a default that works on a laptop CPU; ``ds serve`` flags and ``LLM(**kwargs)`` set the
same fields. Sizes accept bytes or a string with a binary/decimal unit (``"2GiB"``, ``"512MB"``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ds_core.errors import ConfigError, closest

__all__ = ["ServingConfig", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from ``1048576``, ``"1MiB"``, ``"1.5GB"`` ...; a bad value raises naming ``what``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r} is not a size; give bytes or a string such as '2GiB'")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(f"{what}={value!r} is not a size; give bytes or a number with a unit "
                              f"({', '.join(u for u in _UNITS if u)}), e.g. '2GiB'")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}={value!r} must be positive")
    return size


class ServingConfig(BaseModel):
    """How the serving engine batches, caches and bounds its work."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    block_size: int = Field(16, ge=1, le=1024, description=(
        "Tokens per KV-cache block. Prefix sharing happens at block granularity; the Triton kernel needs "
        "a power of two >= 16."))
    max_num_tokens: int = Field(512, ge=1, description=(
        "Token budget of one forward: decode tokens of running requests first, then prefill chunks of "
        "new or partly prefilled prompts (SplitFuse), until the budget is spent."))
    max_num_seqs: int = Field(64, ge=1, description="Most requests running (holding KV blocks) at once.")
    kv_memory: int | str | None = Field(None, description=(
        "Bytes of KV cache ('2GiB'). Default on CUDA: the free memory after loading the model less "
        "max(1 GiB, 10% of the device) for activations; on CPU: enough for max_num_seqs requests of "
        "max_model_len tokens, at most 1 GiB. Ignored when num_kv_blocks is set."))
    num_kv_blocks: int | None = Field(None, ge=1, description="Exact number of KV blocks (overrides kv_memory).")
    max_model_len: int | None = Field(None, ge=2, description=(
        "Longest prompt + output in tokens. Default: the model's max_position_embeddings, capped by the "
        "KV cache capacity."))
    enable_prefix_caching: bool = Field(True, description=(
        "Share full KV blocks between requests with the same token prefix (content-hashed, "
        "reference-counted, evicted least-recently-used)."))
    preemption_mode: Literal["recompute", "swap"] = Field("recompute", description=(
        "When blocks run out, the newest running request is preempted: 'recompute' frees its blocks and "
        "re-prefills it later; 'swap' copies its blocks to host memory and back (recompute when the swap "
        "space is full)."))
    swap_space: int | str = Field(1 << 30, description="Host memory for swapped-out KV blocks (default 1 GiB).")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description=(
        "Fraction of KV blocks kept free when admitting new requests, so running ones can grow a little "
        "before anyone is preempted."))
    max_queue_size: int = Field(256, ge=1, description=(
        "Requests allowed to wait for admission; past it the server answers 429 with Retry-After."))
    request_timeout: float | None = Field(600.0, gt=0, description=(
        "Seconds from arrival after which a request is aborted (finish_reason 'timeout'); None: never."))
    seed: int = Field(0, description="Seed of the sampler for requests that do not give their own.")
    attention_backend: Literal["auto", "torch", "ds_ops"] = Field("auto", description=(
        "'torch': the PyTorch paged attention; 'ds_ops': the ds_ops::paged_attention op (Triton on CUDA); "
        "'auto': the op on CUDA when ds-ops is installed, PyTorch otherwise."))

    @field_validator("kv_memory")
    @classmethod
    def _kv_memory(cls, value):
        return None if value is None else parse_size(value, "kv_memory")

    @field_validator("swap_space")
    @classmethod
    def _swap_space(cls, value):
        return parse_size(value, "swap_space")

    @classmethod
    def build(cls, **kwargs) -> ServingConfig:
        """Like ``ServingConfig(**kwargs)`` but an unknown key or bad value raises a ConfigError naming it."""
        from pydantic import ValidationError

        unknown = [k for k in kwargs if k not in cls.model_fields]
        if unknown:
            key = unknown[0]
            raise ConfigError(f"unknown serving option {key!r}{closest(key, cls.model_fields)}; "
                              f"known options: {', '.join(cls.model_fields)}")
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(f"serving option {field}={kwargs.get(field)!r}: {err['msg']}") from None
