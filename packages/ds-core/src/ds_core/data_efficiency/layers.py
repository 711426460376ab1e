"""Per-layer data efficiency: progressive layer drop and random layerwise token dropping (random-LTD).

Both act on a model's stack of transformer blocks (``GPT.blocks``, Hugging Face's ``transformer.h`` or
``model.layers``: :func:`find_blocks`) by replacing each chosen block's ``forward`` on the instance, so
parameter names, ``state_dict`` keys and checkpoints are exactly the plain model's.

[Note: same choice on every rank] the random draws (which layers are skipped, which tokens are kept)
come from a generator seeded by (seed, forward count, layer index), never from the global RNG: every
data-parallel rank runs the same number of forwards, so all ranks skip the same layers and keep the same
token positions, and a run is reproducible from its seed.

- :class:`LayerDrop` (Zhang & He 2020, PLD): block l of L (1-based) is kept with probability
  p_l = 1 − (l / L)·(1 − θ), θ the schedule's keep probability; a kept block's residual branch is scaled
  by 1/p_l (stochastic depth's unbiased rule), a skipped block is the identity. θ = 1 keeps every block
  and runs it unchanged.
- :class:`RandomLTD` (Yao et al. 2022, "Random-LTD", arXiv:2211.11586): each chosen block processes a
  random, order-preserving subset of k tokens per sequence; the other tokens bypass it unchanged and
  everything is scattered back in place. k = the full length runs the block unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["find_blocks", "LayerDrop", "RandomLTD", "layer_drop"]

_LAYER_DROP = "_ds_layer_drop"
_RANDOM_LTD = "_ds_random_ltd"


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's transformer blocks: the longest ``ModuleList`` (at least 2 entries) whose entries
    share one class. ``(qualified name, list)``; an error when the model has none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ConfigError(f"{type(module).__name__} has no stack of transformer blocks (an nn.ModuleList of "
                          f"2 or more layers of one class) for layer drop / random-LTD to act on; keep the "
                          f"blocks in an nn.ModuleList")
    return best


def _seed(*parts: int) -> int:
    value = 0x9E3779B9
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return value


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise TypeError("a data-efficiency block expects the hidden states as its first argument (or "
                        "hidden_states=)")
    return x


def _replace_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _split(out: Any) -> tuple[torch.Tensor, tuple | None]:
    """A block's output as (hidden states, the rest of a tuple output or None)."""
    if isinstance(out, tuple):
        return out[0], out[1:]
    return out, None


def _output_shape(out: Any) -> int:
    """0 for a block returning a tensor, else the length of the tuple it returns (Hugging Face blocks)."""
    return len(out) if isinstance(out, tuple) else 0


def _join(h: torch.Tensor, rest: tuple | None) -> Any:
    return h if rest is None else (h, *rest)


class LayerDrop:
    """Progressive layer drop over a block stack (see the module docstring). ``theta`` is set before each
    training forward (the engine does it from ``progressive_layer_drop``); ``calls[i]`` counts the
    forwards block ``i`` really ran."""

    def __init__(self, blocks: nn.ModuleList, seed: int = 0) -> None:
        self.blocks = blocks
        self.seed = seed
        self.theta = 1.0
        self.forwards = 0
        self.calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            if hasattr(block, _LAYER_DROP):
                raise ConfigError(f"block {i} already has layer drop installed")
            setattr(block, _LAYER_DROP, self)
            block.forward = self._wrap(i, block, block.forward)

    def begin_forward(self, theta: float) -> None:
        """Called once per training forward, before the model runs."""
        self.theta = float(theta)
        self.forwards += 1

    def keep_probability(self, index: int) -> float:
        """p_l = 1 − (l/L)·(1 − θ) for block ``index`` (0-based, l = index + 1)."""
        return 1.0 - (index + 1) / len(self.blocks) * (1.0 - self.theta)

    def _wrap(self, index: int, block: nn.Module, forward):
        def pld_forward(*args, **kwargs):
            p = self.keep_probability(index)
            if not block.training or p >= 1.0:
                self.calls[index] += 1
                out = forward(*args, **kwargs)
                block._ds_output_shape = _output_shape(out)
                return out
            g = torch.Generator().manual_seed(_seed(self.seed, self.forwards, index))
            x = _hidden(args, kwargs)
            if float(torch.rand((), generator=g)) >= p:  # skipped: the identity
                shape = getattr(block, "_ds_output_shape", None)
                if shape is None:  # a block never run yet (the engine's step 0 has θ = 1, so it has run):
                    # learn once whether it returns a tuple, and how long, to return the same shape
                    with torch.no_grad():
                        shape = _output_shape(forward(*args, **kwargs))
                    block._ds_output_shape = shape
                return x if shape == 0 else (x, *([None] * (shape - 1)))
            self.calls[index] += 1
            h, rest = _split(forward(*args, **kwargs))
            block._ds_output_shape = _output_shape((h, *rest) if rest is not None else h)
            return _join(x + (h - x) / p, rest)

        return pld_forward


def layer_drop(module: nn.Module, seed: int = 0) -> LayerDrop:
    """Install progressive layer drop on ``module``'s block stack (:func:`find_blocks`); the engine does
    this itself when ``progressive_layer_drop`` is enabled and the model's forward takes no ``pld_theta``."""
    return LayerDrop(find_blocks(module)[1], seed)


class RandomLTD:
    """Random layerwise token dropping on the blocks ``layer_ids`` of a stack (see the module docstring).

    ``kept`` (set before each training forward from the schedule) is the number of tokens each chosen
    block processes; ``seq_dim`` is 1 for ``batch_seq_dim`` hidden states, 0 for ``seq_batch_dim``.
    ``mask_name``: a keyword argument of the block holding an attention mask whose last two dimensions are
    the sequence; it is cut to the kept tokens too. ``last_kept[i]`` records the length block ``i`` saw.
    """

    def __init__(self, blocks: nn.ModuleList, layer_ids: list[int], seed: int = 0, seq_dim: int = 1,
                 mask_name: str | None = None) -> None:
        bad = [i for i in layer_ids if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(f"random_ltd_layer_id {bad} outside the model's {len(blocks)} layers (0 to "
                              f"{len(blocks) - 1}); list layers the model has")
        self.blocks, self.layer_ids, self.seed = blocks, list(layer_ids), seed
        self.seq_dim, self.mask_name = seq_dim, mask_name
        self.kept: int | None = None
        self.forwards = 0
        self.last_kept: dict[int, int] = {}
        for i in self.layer_ids:
            block = blocks[i]
            if hasattr(block, _RANDOM_LTD):
                raise ConfigError(f"block {i} already has random-LTD installed")
            setattr(block, _RANDOM_LTD, self)
            block.forward = self._wrap(i, block, block.forward)

    def begin_forward(self, kept: int) -> None:
        self.kept = int(kept)
        self.forwards += 1

    def indices(self, index: int, batch: int, length: int, kept: int, device) -> torch.Tensor:
        """(batch, kept) sorted token positions block ``index`` keeps in this forward."""
        g = torch.Generator().manual_seed(_seed(self.seed, self.forwards, index))
        order = torch.rand(batch, length, generator=g).argsort(dim=1)[:, :kept]
        return order.sort(dim=1).values.to(device)

    def _wrap(self, index: int, block: nn.Module, forward):
        def ltd_forward(*args, **kwargs):
            x = _hidden(args, kwargs)
            length = x.shape[self.seq_dim]
            if not block.training or self.kept is None or self.kept >= length:
                self.last_kept[index] = length
                return forward(*args, **kwargs)
            kept = self.kept
            h = x if self.seq_dim == 1 else x.transpose(0, 1)  # (batch, seq, ...)
            idx = self.indices(index, h.shape[0], length, kept, x.device)
            gather = idx.view(*idx.shape, *([1] * (h.dim() - 2))).expand(-1, -1, *h.shape[2:])
            sub = h.gather(1, gather)
            args, kwargs = _replace_hidden(args, kwargs, sub if self.seq_dim == 1 else sub.transpose(0, 1))
            if self.mask_name and isinstance(kwargs.get(self.mask_name), torch.Tensor):
                kwargs = {**kwargs, self.mask_name: _cut_mask(kwargs[self.mask_name], idx, length)}
            self.last_kept[index] = kept
            out, rest = _split(forward(*args, **kwargs))
            out = out if self.seq_dim == 1 else out.transpose(0, 1)
            merged = h.scatter(1, gather, out.to(h.dtype))  # dropped tokens bypass the block unchanged
            return _join(merged if self.seq_dim == 1 else merged.transpose(0, 1), rest)

        return ltd_forward


def _cut_mask(mask: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
    """An attention mask (..., T, T) cut to the kept positions of each sequence (batch first)."""
    if mask.dim() < 2 or mask.shape[-1] != length or mask.shape[-2] != length:
        return mask
    b, k = idx.shape
    if mask.shape[0] not in (1, b) or mask.dim() < 3:
        lead = mask
        return lead[..., idx[0], :][..., idx[0]]  # one mask for the batch: cut by the first row
    expand = mask.expand(b, *mask.shape[1:])
    rows = idx.view(b, *([1] * (mask.dim() - 3)), k, 1).expand(b, *mask.shape[1:-2], k, length)
    cut = expand.gather(-2, rows)
    cols = idx.view(b, *([1] * (mask.dim() - 3)), 1, k).expand(b, *mask.shape[1:-2], k, k)
    return cut.gather(-1, cols)
