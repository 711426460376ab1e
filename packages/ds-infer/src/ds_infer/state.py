"""Loading a checkpoint source into a module by its own state-dict names (shared by the engine and AutoTP)."""

from __future__ import annotations

import torch
from torch import nn

from .models.sources import CheckpointError

__all__ = ["load_module_state"]


def load_module_state(model: nn.Module, source, where: str, device: torch.device) -> None:
    """Load ``source`` into ``model`` by its own state-dict names (shapes checked first)."""
    state = model.state_dict()
    names = source.names()
    missing = sorted(set(state) - names)
    tied = {n for n in missing if _is_tied(model, n)}
    missing = [n for n in missing if n not in tied]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors of {type(model).__name__} are missing: "
                              f"{', '.join(missing[:6])}; a native model (replace_with_kernel_inject=True) also "
                              "reads transformers' on-disk names")
    bad = [f"{n}: checkpoint {tuple(source.shape(n))} vs model {tuple(state[n].shape)}"
           for n in state if n in names and tuple(source.shape(n)) != tuple(state[n].shape)]
    if bad:
        raise CheckpointError(f"{where} does not fit {type(model).__name__}: " + "; ".join(bad[:5]))
    if any(t.is_meta for t in state.values()):
        model.to_empty(device=device)
    loaded = {n: source.read(n) for n in state if n in names}
    model.load_state_dict(loaded, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _is_tied(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")
