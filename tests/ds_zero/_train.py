"""Shared helpers of the ds-zero tests: a tiny GPT, the DDP reference loop and the engine loop."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
LR, CLIP, WD = 3e-3, 1.0, 0.01


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def config(stage: int | None = None, micro: int = 4, accumulation: int = 1, **over) -> dict:
    base = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": CLIP, "steps_per_print": 0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}}
    if stage is not None:
        base["zero_optimization"] = {"stage": stage}
    base.update(over)
    return base


def batch(micro: int, step: int, rank: int | None = None):
    return synthetic_tokens(micro, CFG.seq_len, CFG.vocab_size, step, dist.get_rank() if rank is None else rank)


def ddp_losses(model, steps: int, micro: int = 4, accumulation: int = 1, find_unused: bool = False) -> list[float]:
    ddp = DDP(model, find_unused_parameters=find_unused)
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(accumulation):
            x, y = batch(micro, step * accumulation + m)
            loss = ddp(x, y)
            (loss / accumulation).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total / accumulation)
    return losses


def train(engine, steps: int, first_step: int = 0, micro: int = 4) -> list[float]:
    """Train ``steps`` optimizer steps; returns the per-step loss of this rank."""
    acc = engine.gradient_accumulation_steps()
    losses = []
    for step in range(first_step, first_step + steps):
        total = 0.0
        for m in range(acc):
            x, y = batch(micro, step * acc + m)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / acc)
    return losses


def engine_losses(model, steps: int, **cfg) -> tuple[list[float], object]:
    engine, *_ = ds_core.initialize(model=model, config=config(**cfg))
    return train(engine, steps, micro=cfg.get("micro", 4)), engine


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))
