"""Pieces shared by the distributed benchmarks: step timing, the ds engine step and the PyTorch reference steps."""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["timed", "ddp_step", "torch_step", "engine_step"]


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


def torch_step(model: torch.nn.Module, batches, lr: float = 1e-4, clip: float = 1.0, set_to_none: bool = False):
    """A plain PyTorch training step over an already wrapped ``model`` (DDP, FSDP2): AdamW, clipping
    by global norm."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(i):
        x, y = batches[i % len(batches)]
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)

    return step


def ddp_step(base: torch.nn.Module, batches, lr: float = 1e-4, clip: float = 1.0):
    """The PyTorch reference: DDP over a copy of ``base``, AdamW, clipping by global norm."""
    return torch_step(DDP(copy.deepcopy(base)), batches, lr, clip)


def engine_step(base: torch.nn.Module, batches, config: dict):
    """The ds engine over a copy of ``base`` built from ``config``; ``step.engine`` is the engine."""
    import ds_core

    engine = ds_core.initialize(model=copy.deepcopy(base), config=config)[0]

    def step(i):
        x, y = batches[i % len(batches)]
        engine.backward(engine(x, y))
        engine.step()

    step.engine = engine
    return step


def timed_median(fn, iters: int, device: str, warmup: int = 2) -> float:
    """Median seconds per call after ``warmup`` calls, timed with CUDA events on a GPU (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
