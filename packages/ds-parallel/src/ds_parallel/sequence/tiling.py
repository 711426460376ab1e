"""Long-context tiling (ALST, Bekman et al. 2025): compute over sequence tiles so the activations of
an MLP and of the logits/loss never exist for the whole sequence at once.

:func:`sequence_tiled_compute` runs ``fn`` tile by tile along the sequence without keeping any
intermediate (no autograd graph in forward), saves only its input, and in backward recomputes one
tile at a time, accumulating the input and parameter gradients. The peak memory of ``fn``'s
intermediates is then that of one tile: an MLP's ``4 × hidden`` activation, or ``tile × vocab``
logits, stays flat as the sequence grows. Parameter gradients are returned once per backward (so
gradient hooks — data-parallel reduction, ZeRO — fire once), and each tile's random-number state is
replayed in its recomputation (dropout draws the same masks).

- :func:`tile_mlp` makes a module (a Hugging Face MLP, any ``x -> y`` block) compute this way;
- :func:`tiled_lm_loss` is the output head and cross-entropy over tiles: returns the loss summed over
  valid tokens and their count (combine with :func:`~ds_parallel.sequence.data.sequence_parallel_loss`
  under sequence parallelism). With a vocabulary-parallel head (logits not gathered) it uses
  :func:`~ds_parallel.loss.vocab_parallel_cross_entropy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import ConfigError

__all__ = ["sequence_tiled_compute", "tile_mlp", "tile_mlps", "tiled_lm_loss", "tiled_causal_lm_loss", "num_tiles"]


def num_tiles(length: int, tiles: int | None = None, tile_size: int | None = None) -> int:
    """Tiles for a sequence of ``length``: ``tiles`` given, else ``ceil(length / tile_size)``, else
    ALST's default ``ceil(length / hidden)``-like rule is up to the caller (1 tile)."""
    if tiles is not None and tile_size is not None:
        raise ConfigError("give tiles= or tile_size=, not both")
    if tile_size is not None:
        if tile_size < 1:
            raise ConfigError(f"tile_size={tile_size} must be >= 1")
        return max(1, math.ceil(length / tile_size))
    if tiles is not None and tiles < 1:
        raise ConfigError(f"tiles={tiles} must be >= 1")
    return min(tiles or 1, max(1, length))


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    acc = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, acc


def _set_rng_state(state, device: torch.device) -> None:
    cpu, acc = state
    torch.set_rng_state(cpu)
    if acc is not None:
        torch.cuda.set_rng_state(acc, device)


class _SequenceTiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, tiles, dim, reduce, extras, *params):
        xs = x.tensor_split(tiles, dim=dim)
        ex = [e.tensor_split(tiles, dim=dim) for e in extras]
        states, outs = [], []
        with torch.no_grad():
            for i, xt in enumerate(xs):
                states.append(_rng_state(x.device))
                outs.append(fn(xt, *[e[i] for e in ex]))
        ctx.fn, ctx.tiles, ctx.dim, ctx.reduce, ctx.extras, ctx.states = fn, tiles, dim, reduce, extras, states
        ctx.save_for_backward(x, *params)
        if reduce == "sum":
            return torch.stack(outs).sum(0)
        return torch.cat(outs, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        wants = [p.requires_grad for p in params]
        xs = x.detach().tensor_split(ctx.tiles, dim=ctx.dim)
        gs = [grad] * ctx.tiles if ctx.reduce == "sum" else grad.tensor_split(ctx.tiles, dim=ctx.dim)
        ex = [e.tensor_split(ctx.tiles, dim=ctx.dim) for e in ctx.extras]
        x_grads = []
        p_grads: list[torch.Tensor | None] = [None] * len(params)
        live = [p for p, w in zip(params, wants) if w]
        current = _rng_state(x.device)
        try:
            for i, (xt, gt) in enumerate(zip(xs, gs)):
                xt = xt.requires_grad_(ctx.needs_input_grad[1])
                _set_rng_state(ctx.states[i], x.device)
                with torch.enable_grad():
                    y = ctx.fn(xt, *[e[i] for e in ex])
                inputs = ([xt] if xt.requires_grad else []) + live
                got = torch.autograd.grad(y, inputs, gt, allow_unused=True) if inputs else ()
                if xt.requires_grad:
                    x_grads.append(got[0])
                    got = got[1:]
                k = 0
                for j, w in enumerate(wants):
                    if w:
                        g = got[k]
                        k += 1
                        if g is not None:
                            p_grads[j] = g if p_grads[j] is None else p_grads[j] + g
        finally:
            _set_rng_state(current, x.device)
        x_grad = torch.cat(x_grads, dim=ctx.dim) if x_grads else None
        return (None, x_grad, None, None, None, None, *p_grads)


def sequence_tiled_compute(fn, x: torch.Tensor, params=(), *, tiles: int | None = None, tile_size: int | None = None,
                           dim: int = 1, reduce: str | None = None, extras=()) -> torch.Tensor:
    """``fn`` over ``tiles`` pieces of ``x`` along ``dim`` (see the module docstring).

    ``params``: the parameters ``fn`` uses (their gradients are computed in backward); ``extras``:
    tensors split alongside ``x`` and passed to ``fn`` (labels), without gradients; ``reduce="sum"``
    adds the tiles' outputs (a loss) instead of concatenating them along ``dim``.
    """
    if reduce not in (None, "sum"):
        raise ConfigError(f"reduce={reduce!r} must be None (concatenate) or 'sum'")
    n = num_tiles(x.shape[dim], tiles, tile_size)
    params = [p for p in params]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        outs = [fn(xt, *et) for xt, *et in zip(x.tensor_split(n, dim), *[e.tensor_split(n, dim) for e in extras])]
        return torch.stack(outs).sum(0) if reduce == "sum" else torch.cat(outs, dim)
    return _SequenceTiled.apply(fn, x, n, dim, reduce, tuple(extras), *params)


def tile_mlp(module: nn.Module, *, tiles: int | None = None, tile_size: int | None = None, dim: int = 1) -> nn.Module:
    """Make ``module`` (``x -> y``, same sequence length) compute over sequence tiles, in place.

    Its state dict and parameters are unchanged; ``module.ds_tiles`` says how it was tiled.
    """
    if getattr(module, "ds_tiles", None) is not None:
        return module
    original = module.forward
    params = [p for p in module.parameters()]

    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise ConfigError("a tiled MLP takes one tensor argument")
        return sequence_tiled_compute(original, x, params, tiles=tiles, tile_size=tile_size, dim=dim)

    module.forward = forward
    module.ds_tiles = (tiles, tile_size)
    return module


def tiled_lm_loss(hidden: torch.Tensor, head: nn.Module, shift_labels: torch.Tensor, *, tiles: int | None = None,
                  tile_size: int | None = None, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss summed over valid tokens, number of valid tokens)`` of ``head(hidden)`` against
    ``shift_labels`` (``[batch, seq]``, the label of each position's next token), ``tiles`` at a time:
    the ``[batch, seq, vocab]`` logits never exist whole."""
    from ..layers import ColumnParallelLinear
    from ..loss import vocab_parallel_cross_entropy

    if hidden.shape[:2] != shift_labels.shape[:2]:
        raise ConfigError(f"hidden {tuple(hidden.shape)} and shift_labels {tuple(shift_labels.shape)} must agree on "
                          f"[batch, seq]")
    sharded = isinstance(head, ColumnParallelLinear) and head.tp.size > 1 and not head.gather_output
    start = head.spec.shard_runs[0][0] if sharded else 0

    def loss(h, labels):
        logits = head(h)
        if sharded:
            return vocab_parallel_cross_entropy(logits, labels, head.tp, start, ignore_index, reduction="sum")
        return F.cross_entropy(logits.float().flatten(0, -2), labels.reshape(-1), ignore_index=ignore_index,
                               reduction="sum")

    total = sequence_tiled_compute(loss, hidden, list(head.parameters()), tiles=tiles, tile_size=tile_size,
                                   dim=1, reduce="sum", extras=(shift_labels,))
    return total, (shift_labels != ignore_index).sum()


def tile_mlps(model: nn.Module, *, tiles: int | None = None, tile_size: int | None = None) -> list[str]:
    """:func:`tile_mlp` every MLP of a transformers model (modules whose class name ends in ``MLP``);
    returns their names."""
    names = [n for n, m in model.named_modules() if type(m).__name__.endswith("MLP")]
    for n in names:
        tile_mlp(model.get_submodule(n), tiles=tiles, tile_size=tile_size)
    return names


def tiled_causal_lm_loss(model: nn.Module, shift_labels: torch.Tensor, *, tiles: int | None = None,
                         tile_size: int | None = None, group=None, ignore_index: int = -100,
                         **inputs) -> torch.Tensor:
    """A transformers causal LM's mean loss with the head and cross-entropy computed over sequence tiles.

    Runs the decoder (``model.get_decoder()``) on ``inputs`` (``input_ids``, ``position_ids``, ...), then
    :func:`tiled_lm_loss` with the output head; the mean is over the valid tokens of the sequence
    ``group`` (:func:`~ds_parallel.sequence.data.sequence_parallel_loss`; ``None``: this process).
    For models whose output head is a plain linear layer (no logit soft-capping or scaling).
    """
    from .data import sequence_parallel_loss

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise ConfigError(f"{type(model).__name__} has no separate decoder (get_decoder()); tile its loss with "
                          f"tiled_lm_loss(hidden, head, shift_labels)")
    hidden = decoder(**inputs).last_hidden_state
    total, valid = tiled_lm_loss(hidden, model.get_output_embeddings(), shift_labels, tiles=tiles,
                                 tile_size=tile_size, ignore_index=ignore_index)
    return sequence_parallel_loss(total, valid, group)
