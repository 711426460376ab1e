"""Shared training loops for the parity tests: the ds engine with tensor parallelism, and the
unsharded model on one process with plain PyTorch (same optimizer class, same clipping rule)."""

from __future__ import annotations

import torch

from ds_core.testing.models import synthetic_tokens

from ._models import gpt, hf_model

LR = 3e-3
CLIP = 0.5  # small enough that clipping acts on most steps: the global norm must be right
STEPS = 20
BATCH = 4  # global batch: split over data-parallel ranks
SEQ = 16


def build(kind: str, seed: int = 0):
    if kind == "gpt":
        return gpt(seed)
    return hf_model(kind, seed)


def loss_of(kind: str, model, tokens, targets):
    if kind == "gpt":
        return model(tokens, targets)
    return model(input_ids=tokens, labels=tokens).loss  # the model shifts the labels itself


def batch(step: int):
    return synthetic_tokens(BATCH, SEQ, 64, step)


def optimizer(groups):
    return torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)


def reference_losses(kind: str, steps: int = STEPS, norms: list | None = None) -> list[float]:
    """Losses of the unsharded model on one process; ``norms`` collects each step's global gradient norm."""
    model = build(kind)
    opt = optimizer(model.parameters())
    losses = []
    for step in range(steps):
        tokens, targets = batch(step)
        loss = loss_of(kind, model, tokens, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if norms is not None:
            norms.append(norm.item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def engine_losses(kind: str, config: dict, steps: int = STEPS, dp_rank: int = 0, dp: int = 1,
                  norms: list | None = None):
    """Losses through ``ds_core.initialize``; ``norms`` collects the engine's global gradient norms."""
    import ds_core

    model = build(kind)
    engine, *_ = ds_core.initialize(model=model, optimizer=optimizer, config=config)
    losses = []
    per = BATCH // dp
    for step in range(steps):
        tokens, targets = batch(step)
        tokens, targets = tokens[dp_rank * per:(dp_rank + 1) * per], targets[dp_rank * per:(dp_rank + 1) * per]
        loss = loss_of(kind, engine, tokens, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if norms is not None:
            norms.append(engine.get_global_grad_norm())
    return losses, engine
