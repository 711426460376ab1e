"""Pieces shared by the distributed benchmarks: step timing and the DDP reference step."""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["timed", "ddp_step"]


def timed(step_fn, steps: int, warmup: int = 2) -> float:
    """Seconds per call of ``step_fn(i)`` after ``warmup`` calls, between barriers on every rank."""
    for i in range(warmup):
        step_fn(i)
    dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        step_fn(warmup + i)
    dist.barrier()
    return (time.perf_counter() - start) / steps


def ddp_step(base: torch.nn.Module, batches, lr: float = 1e-4, clip: float = 1.0):
    """The PyTorch reference: DDP over a copy of ``base``, AdamW, clipping by global norm."""
    ddp = DDP(copy.deepcopy(base))
    opt = torch.optim.AdamW(ddp.parameters(), lr=lr)

    def step(i):
        x, y = batches[i % len(batches)]
        loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=False)

    return step
