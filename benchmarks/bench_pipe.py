"""Pipeline bubble vs theory, and ds_pipe 1F1B vs torch.distributed.pipelining's Schedule1F1B.

    python benchmarks/bench_pipe.py [--ms 20] [--stages 2 4] [--micro 4 8 16]

Each stage is one layer whose forward sleeps ``ms`` and whose backward sleeps ``2·ms`` (a sleeping
autograd function), so compute time is fixed and the measurement isolates the schedule. Measured
bubble = 1 − (ideal compute time of one stage) / (measured batch time); theory (p − 1)/(m + p − 1).
Then, on the same model and the same ranks in the same run, torch's ``Schedule1F1B`` batch time is
measured and the throughput ratio printed; when DeepSpeed is importable, so is its ``PipelineModule``
engine's (``train_batch``, same layers, partitioning and micro-batches; ``_deepspeed.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch
import torch.distributed as dist
from _deepspeed import ds_config, import_deepspeed, rank_env, unavailable
from torch import nn

import ds_core
from ds_core.testing import run_distributed

WIDTH, MICRO = 64, 2


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SleepLayer(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x):
        return _Sleep.apply(x * self.weight, self.seconds)


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _ours(p: int, m: int, seconds: float, reps: int) -> float:
    from ds_pipe import LayerSpec, PipelineModule

    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=p)
    model = PipelineModule([LayerSpec(SleepLayer, seconds) for _ in range(p)], topology=topo, loss_fn=_mse,
                           partition_method="uniform")
    engine, *_ = ds_core.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": m, "steps_per_print": 0})
    batch = (torch.ones(MICRO, WIDTH), torch.zeros(MICRO, WIDTH))

    def data():
        while True:
            yield batch
    it = data()
    engine.train_batch(it)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        engine.train_batch(it)
    dist.barrier()
    return (time.perf_counter() - start) / reps


def _timed_batches(engine, reps: int) -> float:
    batch = (torch.ones(MICRO, WIDTH), torch.zeros(MICRO, WIDTH))

    def data():
        while True:
            yield batch
    it = data()
    engine.train_batch(it)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        engine.train_batch(it)
    dist.barrier()
    return (time.perf_counter() - start) / reps


def _deepspeed(p: int, m: int, seconds: float, reps: int) -> float:
    deepspeed = import_deepspeed()
    from deepspeed.pipe import LayerSpec, PipelineModule

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its partitioning
        model = PipelineModule([LayerSpec(SleepLayer, seconds) for _ in range(p)], num_stages=p, loss_fn=_mse,
                               partition_method="uniform")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config({"train_micro_batch_size_per_gpu": MICRO,
                                                        "gradient_accumulation_steps": m, "steps_per_print": 0}))
    return _timed_batches(engine, reps)


def _torch(p: int, m: int, seconds: float, reps: int) -> float:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    rank = dist.get_rank()
    stage = PipelineStage(SleepLayer(seconds), rank, p, torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=_mse)
    x, y = torch.ones(MICRO * m, WIDTH), torch.zeros(MICRO * m, WIDTH)

    def step():
        if rank == 0:
            sched.step(x)
        elif rank == p - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
    step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    dist.barrier()
    return (time.perf_counter() - start) / reps


def _bench(p: int, micro: list[int], seconds: float, reps: int, with_deepspeed: bool = False):
    rows = []
    for m in micro:
        ours = _ours(p, m, seconds, reps)
        theirs = _torch(p, m, seconds, reps)
        rows.append((m, ours, theirs, _deepspeed(p, m, seconds, reps) if with_deepspeed else None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ms", type=float, default=20.0, help="forward sleep per stage (backward is 2x)")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from ds_pipe.schedule import theoretical_bubble

    seconds = args.ms / 1000
    skipped = unavailable()
    print(f"stage compute: forward {args.ms:.0f} ms, backward {2 * args.ms:.0f} ms (sleep); gloo on CPU")
    if skipped:
        print(skipped)
    print(f"{'p':>2} {'m':>3} {'ideal s':>8} {'ds_pipe s':>9} {'bubble':>7} {'theory':>7} {'torch 1F1B s':>12} "
          f"{'ds/torch thru':>13} {'DeepSpeed s':>11} {'ds/DeepSpeed time':>17}")
    for p in args.stages:
        rows = run_distributed(_bench, p, args=(p, args.micro, seconds, args.reps, skipped is None), timeout=1200,
                               env=rank_env())[0]
        for m, ours, theirs, deep in rows:
            ideal = m * 3 * seconds
            deep_cols = f"{deep:>11.3f} {ours / deep:>17.3f}" if deep is not None else f"{'n/a':>11} {'n/a':>17}"
            print(f"{p:>2} {m:>3} {ideal:>8.3f} {ours:>9.3f} {1 - ideal / ours:>7.3f} "
                  f"{theoretical_bubble(p, m):>7.3f} {theirs:>12.3f} {theirs / ours:>13.2f} {deep_cols}", flush=True)


if __name__ == "__main__":
    main()
