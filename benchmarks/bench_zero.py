"""ZeRO stage 2 step time vs the engine's stage 0 and plain PyTorch DDP, and CPU offload vs none.

    python benchmarks/bench_zero.py [--steps 10] [--rounds 3] [--dim 384] [--layers 6]

Same GPT (>= 10M parameters), same data, 2 gloo ranks with one thread each, same run. Every loop does
forward, backward (gradients averaged across ranks), clipping at 1.0 and AdamW. Runs alternate
(DDP, stage 0, stage 2, stage 2 + offload, DDP, ...) so machine noise hits all of them; the ratios
of medians are printed (target: stage 2 / DDP <= 1.1). Stage 2 uses 25 MB buckets (DDP's default)
with overlap_comm (on gloo its bucket reduction is an all-reduce, see ds_zero.reduce). On a CPU-only machine "offload" moves host memory to host memory: it measures the
extra copies and the separate optimizer buffers, not a PCIe transfer. When DeepSpeed is importable
its ZeRO-2 and ZeRO-2 + CPU offload (same config) join the alternation and ds / DeepSpeed is printed
for both (``_deepspeed.py``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from _common import ddp_step as ddp_step_for
from _common import engine_step, timed
from _deepspeed import deepspeed_step, rank_env, ratio_line, unavailable

from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

BUCKET = 25 * 1024 * 1024 // 4  # elements: DDP's 25 MB


def _config(micro, zero):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    if zero is not None:
        config["zero_optimization"] = zero
    return config


def _engine_step(base, micro, batches, zero):
    return engine_step(base, batches, _config(micro, zero))


def _bench(steps: int, dim: int, layers: int, micro: int, rounds: int, with_deepspeed: bool = False):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    rank = dist.get_rank()
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, rank) for i in range(8)]
    base = GPT(cfg)

    ddp_step = ddp_step_for(base, batches)

    stage2 = {"stage": 2, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET, "overlap_comm": True}
    runs = {"ddp": ddp_step,
            "stage0": _engine_step(base, micro, batches, None),
            "stage2": _engine_step(base, micro, batches, stage2),
            "offload": _engine_step(base, micro, batches, {**stage2, "offload_optimizer": {"device": "cpu"}})}
    if with_deepspeed:
        runs["ds_stage2"] = deepspeed_step(base, batches, _config(micro, stage2))
        runs["ds_offload"] = deepspeed_step(base, batches, _config(
            micro, {**stage2, "offload_optimizer": {"device": "cpu"}}))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, steps))
    params = sum(p.numel() for p in base.parameters())
    return params, {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    with_deepspeed = unavailable() is None
    params, t = run_distributed(_bench, 2, args=(args.steps, args.dim, args.layers, args.micro, args.rounds,
                                                 with_deepspeed), timeout=3600, env=rank_env())[0]
    print(f"model: GPT {params / 1e6:.2f}M params, micro-batch {args.micro} × seq 128, 2 gloo ranks, 1 thread each, "
          f"median of {args.rounds} rounds × {args.steps} steps")
    for name, label in (("ddp", "PyTorch DDP"), ("stage0", "ds stage 0"), ("stage2", "ds ZeRO stage 2"),
                        ("offload", "ds ZeRO-2 + CPU offload"), ("ds_stage2", "DeepSpeed ZeRO-2"),
                        ("ds_offload", "DeepSpeed ZeRO-2 + offload")):
        if name in t:
            print(f"{label:<26} step: {t[name] * 1e3:8.1f} ms")
    print(f"ratio stage 2 / DDP:       {t['stage2'] / t['ddp']:.3f}  (target <= 1.1)")
    print(f"ratio stage 2 / stage 0:   {t['stage2'] / t['stage0']:.3f}")
    print(f"ratio offload / stage 2:   {t['offload'] / t['stage2']:.3f}")
    print(ratio_line("stage 2 / DeepSpeed ZeRO-2", t["stage2"], t.get("ds_stage2")))
    print(ratio_line("stage 2 + offload / DeepSpeed ZeRO-2 + offload", t["offload"], t.get("ds_offload")))


if __name__ == "__main__":
    main()
