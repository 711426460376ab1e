"""Engine step time vs plain PyTorch DDP: same GPT, same data, 2 gloo ranks, same run.

    python benchmarks/bench_engine.py [--steps 30] [--dim 256] [--layers 4]

Both loops do forward, backward (gradients averaged across ranks), gradient clipping and AdamW.
Runs alternate (DDP, engine, DDP, engine, ...) so machine noise hits both; the ratio of medians is
printed (target: engine / DDP <= 1.05). When DeepSpeed is importable its engine (stage 0, same config)
joins the alternation and engine / DeepSpeed is printed too (``_deepspeed.py``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from _common import ddp_step as ddp_step_for
from _common import engine_step as engine_step_for
from _common import timed
from _deepspeed import deepspeed_step, rank_env, ratio_line, unavailable

from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens


def _bench(steps: int, dim: int, layers: int, micro: int, rounds: int, with_deepspeed: bool = False):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    rank = dist.get_rank()
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, rank) for i in range(8)]
    base = GPT(cfg)

    ddp_step = ddp_step_for(base, batches)

    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    runs = {"ddp": ddp_step, "ds": engine_step_for(base, batches, config)}
    if with_deepspeed:
        runs["deepspeed"] = deepspeed_step(base, batches, config)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, steps))
    params = sum(p.numel() for p in base.parameters())
    return params, {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()
    with_deepspeed = unavailable() is None
    results = run_distributed(_bench, 2, args=(args.steps, args.dim, args.layers, args.micro, args.rounds,
                                               with_deepspeed), timeout=3600, env=rank_env())
    params, t = results[0]
    ddp_t, ds_t = t["ddp"], t["ds"]
    print(f"model: GPT {params / 1e6:.2f}M params, micro-batch {args.micro} × seq 128, 2 gloo ranks, 1 thread each, "
          f"median of {args.rounds} rounds × {args.steps} steps")
    print(f"PyTorch DDP   step: {ddp_t * 1e3:8.1f} ms")
    print(f"ds engine     step: {ds_t * 1e3:8.1f} ms")
    if "deepspeed" in t:
        print(f"DeepSpeed     step: {t['deepspeed'] * 1e3:8.1f} ms")
    print(f"ratio engine / DDP: {ds_t / ddp_t:.3f}  (target <= 1.05)")
    print(ratio_line("engine / DeepSpeed", ds_t, t.get("deepspeed")))


if __name__ == "__main__":
    main()
