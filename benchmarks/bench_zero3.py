"""ZeRO stage 3 step time and peak memory vs PyTorch FSDP2 (``fully_shard``) on the same GPT.

    python benchmarks/bench_zero3.py [--steps 10] [--rounds 3] [--dim 384] [--layers 6]

Same GPT, same data, 2 gloo ranks with one thread each. Every loop does forward, backward
(gradients reduce-scattered), clipping at 1.0 and AdamW. FSDP2 shards with one ``fully_shard`` call
per transformer block plus one for the root (its recommended wrapping); ds stage 3 gathers each
module's own parameters around its forward and backward, with ``overlap_comm`` and the default
persistence threshold. Timings alternate (FSDP2, stage 3, FSDP2, ...) in one run so machine noise
hits both; the ratio of medians is printed. Peak memory is each configuration's peak resident set
size per rank (``ru_maxrss``) in a fresh pair of processes running 3 steps, minus the RSS before the
model is built — on a CPU machine the closest measure of the memory a rank needed.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics

import torch
import torch.distributed as dist
from _common import timed

import ds_core
from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

LR, CLIP = 1e-4, 1.0


def _ds_step(base, micro, batches, overlap=True):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": CLIP, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": LR}},
              "zero_optimization": {"stage": 3, "overlap_comm": overlap}}
    engine, *_ = ds_core.initialize(model=copy.deepcopy(base), config=config)

    def step(i):
        x, y = batches[i % len(batches)]
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    return step


def _fsdp_step(base, batches):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(base)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(i):
        x, y = batches[i % len(batches)]
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return step


def _setup(dim, layers, micro):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, dist.get_rank()) for i in range(8)]
    return GPT(cfg), batches


def _time(steps, dim, layers, micro, rounds):
    base, batches = _setup(dim, layers, micro)
    runs = {"fsdp": _fsdp_step(base, batches), "zero3": _ds_step(base, micro, batches)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, steps))
    return sum(p.numel() for p in base.parameters()), {k: statistics.median(v) for k, v in times.items()}


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory(which, dim, layers, micro):
    before = _rss_kib()
    base, batches = _setup(dim, layers, micro)
    model_bytes = sum(p.numel() * 4 for p in base.parameters())
    step = _fsdp_step(base, batches) if which == "fsdp" else _ds_step(base, micro, batches)
    del base
    for i in range(3):
        step(i)
    return (_rss_kib() - before) * 1024, model_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    shape = (args.dim, args.layers, args.micro)
    params, t = run_distributed(_time, 2, args=(args.steps, *shape, args.rounds), timeout=3600)[0]
    mem = {w: run_distributed(_memory, 2, args=(w, *shape), timeout=3600) for w in ("fsdp", "zero3")}
    print(f"model: GPT {params / 1e6:.2f}M params, micro-batch {args.micro} × seq 128, 2 gloo ranks, 1 thread "
          f"each, median of {args.rounds} rounds × {args.steps} steps")
    for name, label in (("fsdp", "PyTorch FSDP2"), ("zero3", "ds ZeRO stage 3")):
        peaks = ", ".join(f"{m / 2**20:.1f}" for m, _ in mem[name])
        print(f"{label:<18} step: {t[name] * 1e3:8.1f} ms   peak RSS growth per rank: {peaks} MiB")
    model_mib = mem["fsdp"][0][1] / 2**20
    print(f"(fp32 model alone: {model_mib:.1f} MiB; each rank also built the full model before sharding)")
    print(f"ratio stage 3 / FSDP2 step time:  {t['zero3'] / t['fsdp']:.3f}")
    ratio = max(m for m, _ in mem["zero3"]) / max(m for m, _ in mem["fsdp"])
    print(f"ratio stage 3 / FSDP2 peak memory: {ratio:.3f}")


if __name__ == "__main__":
    main()
