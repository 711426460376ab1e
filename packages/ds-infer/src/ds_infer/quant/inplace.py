"""Quantizing a module in place: every ``nn.Linear`` (but the output head) becomes quantized.

Used by ``init_inference(model, quant=...)`` without kernel injection, so a transformers model keeps
its class, its forward and its own ``.generate`` while its linear weights are stored packed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models.layers import DENSE_LINEARS
from .factory import KEEP_DENSE, factory_for

__all__ = ["quantize_in_place"]


def quantize_in_place(model: nn.Module, quant: Any) -> int:
    """Replace the ``nn.Linear`` layers of ``model``; returns how many were replaced."""
    factory = factory_for(quant)
    # the output head stays dense: by name, as the model's output embeddings, or tied to an embedding
    keep = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        keep.add(id(head.weight))
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in DENSE_LINEARS and not name.endswith(KEEP_DENSE) and id(m.weight) not in keep]
    for name, module in targets:
        bias = module.bias.detach() if module.bias is not None else None
        model.set_submodule(name, factory.dense(name, module.weight.detach(), bias))
    return len(targets)
