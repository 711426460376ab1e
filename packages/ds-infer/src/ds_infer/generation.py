"""The decode loop: ``generate(model, input_ids, ...)`` for any causal LM.

Three kinds of model, one loop:

- a native model (:class:`~ds_infer.models.CausalLM`): prefill + static-KV-cache decode steps
  (:class:`~ds_infer.decode.Decoder`, optionally captured with ``torch.compile`` / CUDA graphs);
- a ``transformers`` causal LM of any architecture: its own forward and its own KV cache
  (``past_key_values``), with positions and masks for left padding;
- a plain ``nn.Module`` whose ``forward(input_ids)`` returns logits ``[B, T, V]`` (or an object
  with ``.logits``): the whole sequence is recomputed each step (no cache to reuse).

Batches are left-padded (``attention_mask`` 1 for tokens, 0 for padding). A row finishes at an
``eos_token_id`` or when its generated tokens end with one of ``stop`` (token-id sequences); after
that it is filled with ``pad_token_id``. The result is ``[B, prompt + new]`` like transformers'.
``streamer`` is called after every step: a callable ``streamer(step, tokens[B])`` or an object with
``put(tokens)`` / ``end()`` (transformers' streamers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ds_core.errors import ConfigError

from .sampling import apply_repetition_penalty, select

if TYPE_CHECKING:
    from .models.base import CausalLM

__all__ = ["GenerationConfig", "generate", "GenerationError"]


class GenerationError(ConfigError):
    """Bad generate() input: the message names the value, the rule and the fix."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: list[list[int]] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens {self.max_new_tokens} must be >= 0")
        if self.temperature <= 0 and self.do_sample:
            raise GenerationError(f"temperature {self.temperature} must be > 0 when sampling; use do_sample=False "
                                  "for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise GenerationError(f"top_k {self.top_k} must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1.0 disables it)")


_KEYS = {f.name for f in fields(GenerationConfig)}


def _config(config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
    unknown = sorted(set(kwargs) - _KEYS)
    if unknown:
        from ds_core.errors import closest

        raise GenerationError(f"generate() got unknown argument {unknown[0]!r}{closest(unknown[0], _KEYS)}; "
                              f"it accepts {', '.join(sorted(_KEYS))}, attention_mask, streamer, generator")
    cfg = replace(config or GenerationConfig(), **kwargs)
    if isinstance(cfg.stop, Sequence) and cfg.stop and isinstance(cfg.stop[0], int):
        cfg.stop = [list(cfg.stop)]
    cfg.validate()
    return cfg


def _eos_ids(eos: int | Sequence[int] | None) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _model_defaults(model: nn.Module) -> dict[str, Any]:
    """eos/pad defaults from a native arch or a transformers config."""
    arch = getattr(model, "arch", None)
    if arch is not None:
        return {"eos_token_id": arch.eos_token_id, "pad_token_id": arch.pad_token_id}
    gen = getattr(model, "generation_config", None) or getattr(model, "config", None)
    if gen is None:
        return {}
    return {"eos_token_id": getattr(gen, "eos_token_id", None), "pad_token_id": getattr(gen, "pad_token_id", None)}


class _Streamer:
    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.step = 0

    def __call__(self, tokens: Tensor) -> None:
        if self.streamer is None:
            return
        if hasattr(self.streamer, "put"):
            self.streamer.put(tokens.cpu())
        else:
            self.streamer(self.step, tokens)
        self.step += 1

    def end(self) -> None:
        if self.streamer is not None and hasattr(self.streamer, "end"):
            self.streamer.end()


@torch.inference_mode()
def generate(model: nn.Module, input_ids: Tensor, config: GenerationConfig | None = None, *,
             attention_mask: Tensor | None = None, streamer: Any = None,
             generator: torch.Generator | None = None, decoder: Any = None,
             max_length_limit: int | None = None, **kwargs: Any) -> Tensor:
    """Generate up to ``max_new_tokens`` after each (left-padded) prompt row; see the module docstring.

    Accepts the :class:`GenerationConfig` fields as keywords (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``,
    ``pad_token_id``, ``stop``, ``seed``, ``min_new_tokens``). ``max_length_limit``: the engine's
    ``max_out_tokens`` (prompt + new tokens must fit).
    """
    defaults = {k: v for k, v in _model_defaults(model).items() if k not in kwargs and v is not None}
    cfg = _config(config, {**defaults, **kwargs} if config is None else kwargs)
    if config is not None:
        for k, v in defaults.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
    input_ids = _check_inputs(input_ids, attention_mask)
    b, p = input_ids.shape
    if max_length_limit is not None and p + cfg.max_new_tokens > max_length_limit:
        raise GenerationError(f"prompt length {p} + max_new_tokens {cfg.max_new_tokens} = "
                              f"{p + cfg.max_new_tokens} exceeds max_out_tokens {max_length_limit}; lower "
                              "max_new_tokens or raise max_out_tokens in init_inference")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if generator is None and cfg.seed is not None and cfg.do_sample:
        generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    if cfg.max_new_tokens == 0:
        return input_ids

    if getattr(type(model), "ds_native_decoder", False):
        _check_positions(model, p + cfg.max_new_tokens)
        from .decode import Decoder

        dec = decoder or Decoder(model)
        first = dec.prefill(input_ids, attention_mask, cfg.max_new_tokens)
        step = dec.step
    elif _is_hf(model):
        first, step = _hf_stepper(model, input_ids, attention_mask)
    else:
        first, step = _plain_stepper(model, input_ids, attention_mask)
    return _loop(input_ids, first, step, cfg, streamer, generator)


def _check_inputs(input_ids: Any, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(input_ids, Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise GenerationError(f"input_ids must be integer token ids of shape [batch, length]; got "
                              f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids is empty; give at least one prompt token (e.g. the BOS token)")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                  f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise GenerationError("attention_mask has padding at the end of a row; pad prompts on the left "
                                  "(tokenizer.padding_side = 'left')")
    return input_ids.long()


def _check_positions(model: CausalLM, total: int) -> None:
    arch = model.arch
    if arch.rope is None and total > arch.max_position_embeddings:
        raise GenerationError(f"prompt + max_new_tokens = {total} exceeds the {arch.max_position_embeddings} learned "
                              f"positions of this {arch.model_type} model; shorten the prompt or max_new_tokens")


def _loop(input_ids: Tensor, logits: Tensor, step: Callable[[Tensor], Tensor], cfg: GenerationConfig,
          streamer: Any, generator: torch.Generator | None) -> Tensor:
    b = input_ids.shape[0]
    eos = torch.tensor(_eos_ids(cfg.eos_token_id), device=input_ids.device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    seen = input_ids
    stream = _Streamer(streamer)
    for i in range(cfg.max_new_tokens):
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if i < cfg.min_new_tokens and eos.numel():
            logits = logits.index_fill(1, eos, float("-inf"))
        tokens = select(logits, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
        out.append(tokens[:, None])
        if cfg.repetition_penalty != 1.0:
            seen = torch.cat([seen, tokens[:, None]], dim=1)
        stream(tokens)
        if eos.numel():
            done = done | torch.isin(tokens, eos)
        if cfg.stop:
            done = done | _stopped(torch.cat(out[1:], dim=1), cfg.stop)
        if bool(done.all()) or i == cfg.max_new_tokens - 1:
            break
        logits = step(tokens)
    stream.end()
    return torch.cat(out, dim=1)


def _stopped(generated: Tensor, stops: list[list[int]]) -> Tensor:
    hit = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    for seq in stops:
        n = len(seq)
        if n and generated.shape[1] >= n:
            hit |= (generated[:, -n:] == torch.tensor(seq, device=generated.device)).all(dim=1)
    return hit


# -- transformers models: their own forward and cache ------------------------------------------

def _is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "model_type") and hasattr(model, "prepare_inputs_for_generation")


def _last_logits(out: Any) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    return logits[:, -1].float()


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def _hf_stepper(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None):
    b, p = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    # transformers renames past_key_values to cache (5.x); pass whichever this model's forward takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    state = {"past": _cache_of(out), "mask": mask, "pos": positions[:, -1:]}

    def step(tokens: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(tokens[:, None])], dim=1)
        state["pos"] = state["pos"] + 1
        o = model(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                  use_cache=True, **{cache_arg: state["past"]})
        state["past"] = _cache_of(o)
        return _last_logits(o)

    return _last_logits(out), step


# -- plain modules: recompute the sequence --------------------------------------------------------

def _plain_stepper(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None):
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    if attention_mask is not None and not takes_mask:
        raise GenerationError(f"{type(model).__name__}.forward takes no attention_mask, so a left-padded batch "
                              "would attend to its padding; generate rows of different lengths separately or "
                              "give the model an attention_mask argument")
    state = {"ids": input_ids, "mask": attention_mask}

    def run() -> Tensor:
        if takes_mask and state["mask"] is not None:
            return _last_logits(model(state["ids"], attention_mask=state["mask"]))
        return _last_logits(model(state["ids"]))

    def step(tokens: Tensor) -> Tensor:
        state["ids"] = torch.cat([state["ids"], tokens[:, None]], dim=1)
        if state["mask"] is not None:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(tokens[:, None])], dim=1)
        return run()

    return run(), step
