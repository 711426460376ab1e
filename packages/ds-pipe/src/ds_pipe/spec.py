"""Layer specifications: layers described, then built only on the stage that owns them.

``LayerSpec(cls, *args, **kwargs)`` delays ``cls(*args, **kwargs)`` until the pipeline module knows
which stage the layer lands on, so a rank never allocates another stage's weights (DeepSpeed's
``PipelineModule`` surface). ``TiedLayerSpec`` names a module shared by several positions — an input
embedding reused as the output head (Press & Wolf 2017): each stage holding the key builds it once,
and the engine keeps the copies identical by all-reducing their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ds_core.errors import ConfigError

__all__ = ["LayerSpec", "TiedLayerSpec"]


class LayerSpec:
    """``cls(*args, **kwargs)``, built on demand by :meth:`build`."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any) -> None:
        if not isinstance(typename, type) or not issubclass(typename, torch.nn.Module):
            raise ConfigError(f"LayerSpec({typename!r}): the first argument must be a torch.nn.Module "
                              f"subclass; wrap functions as layers directly in the layer list instead")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> torch.nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module (and so ``tied_weight_attr``) is shared by every spec with the same ``key``.

    ``forward_fn(module, inputs)`` replaces ``module(inputs)`` at this position (e.g. multiply by the
    transposed embedding matrix to produce logits). ``tied_weight_attr`` is an attribute path
    (``"weight"``, ``"tok.weight"``) or a list of them: the parameters whose gradients are summed
    across the stages that hold the key.
    """

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Callable | None = None,
                 tied_weight_attr: str | list[str] = "weight", **module_kwargs: Any) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.typename.__name__})"
