"""Tokens to a target loss with and without data efficiency: the tiny GPT on fixed data, one process.

    python benchmarks/bench_data_efficiency.py [--steps 300] [--seq 64] [--dim 64] [--layers 4] [--seed 0]

Runs, same model seed and same batches, in one run:

- ``baseline``: plain training at the full sequence length;
- ``curriculum``: ``curriculum_learning`` seqlen, fixed_linear from seq/8 to seq over the first half;
- ``random_ltd``: ``data_routing.random_ltd`` on the middle layers, kept tokens from seq/4 to seq over
  the first half;
- ``pld``: ``progressive_layer_drop`` theta 0.5, gamma 0.01.

Every ``--eval-every`` steps the held-out loss is measured at the full length (eval mode: nothing is
truncated or dropped). The target is the baseline's held-out loss at ``--steps``; for each run the
script prints the first step at which the held-out loss reaches it, the input tokens trained on until
then and the token-layers computed until then (a dropped token skips the chosen layers; a skipped layer
computes nothing), and the ratio to the baseline's. Runs go to 1.5 × ``--steps``; "not reached" is
printed when a run does not get there.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens


def _run(name: str, extra: dict, args, cfg: GPTConfig, batches, held_out, target: float | None):
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "steps_per_print": 0, "seed": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}}, **extra}
    engine, *_ = ds_core.initialize(model=model, config=config)
    calls = [0] * cfg.layers
    for i, block in enumerate(engine.module.blocks):
        # token-layers: a block's input length when it really runs (its first LayerNorm sees the kept tokens)
        block.ln1.register_forward_hook(
            lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + (inp[0].shape[0] * inp[0].shape[1]
                                                                      if m.training else 0)))
    tokens = 0
    curve = []
    reached = None
    start = time.perf_counter()
    limit = int(args.steps * 1.5) if target is not None else args.steps
    for step in range(limit):
        x, y = batches[step % len(batches)]
        engine.train()
        loss = engine(x, y)
        d = engine.curriculum_seqlen() or x.shape[1]
        tokens += x.shape[0] * min(d, x.shape[1])
        engine.backward(loss)
        engine.step()
        if (step + 1) % args.eval_every == 0:
            engine.eval()
            with torch.no_grad():
                held = sum(float(engine(hx, hy)) for hx, hy in held_out) / len(held_out)
            curve.append((step + 1, held))
            if target is not None and reached is None and held <= target:
                reached = (step + 1, tokens, sum(calls), time.perf_counter() - start)
                break
    engine.destroy()
    return {"name": name, "curve": curve, "reached": reached, "tokens": tokens, "token_layers": sum(calls),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--pool", type=int, default=64, help="distinct training batches, cycled")
    parser.add_argument("--seed", type=int, default=0, help="model initialization and data seed")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cfg = GPTConfig(vocab_size=128, seq_len=args.seq, dim=args.dim, layers=args.layers, heads=4)
    batches = [synthetic_tokens(args.batch, args.seq, cfg.vocab_size, i, args.seed) for i in range(args.pool)]
    held_out = [synthetic_tokens(args.batch, args.seq, cfg.vocab_size, 10_000 + i, args.seed) for i in range(4)]
    half = max(1, args.steps // 2)
    lo = max(8, args.seq // 8 // 8 * 8)
    runs = {
        "curriculum": {"curriculum_learning": {
            "enabled": True, "curriculum_type": "seqlen", "min_difficulty": lo, "max_difficulty": args.seq,
            "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": half,
                                                                 "difficulty_step": 8}}},
        "random_ltd": {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
            "enabled": True, "random_ltd_layer_id": list(range(1, args.layers - 1)),
            "random_ltd_layer_num": args.layers - 2, "model_type": "decoder",
            "hidden_state_order": "batch_seq_dim", "random_ltd_schedule": {
                "min_value": max(8, args.seq // 4 // 8 * 8), "max_value": args.seq, "schedule_type": "fixed_linear",
                "schedule_config": {"require_steps": half, "seq_per_step": 8}}}}}},
        "pld": {"progressive_layer_drop": {"enabled": True, "theta": 0.5, "gamma": 0.01}},
    }
    base = _run("baseline", {}, args, cfg, batches, held_out, None)
    target = base["curve"][-1][1]
    base_reached = next((s, None) for s, loss in base["curve"] if loss <= target)
    # the baseline's own tokens and token-layers at the step it reached the target (it is its last)
    b_step = base_reached[0]
    b_tokens = b_step * args.batch * args.seq
    b_layers = b_tokens * args.layers
    print(f"tiny GPT dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
          f"{args.pool} fixed batches, seed {args.seed}; target = baseline held-out loss at step {args.steps}: {target:.4f}")
    print(f"{'run':<12} {'step':>6} {'tokens':>10} {'token-layers':>13} {'tokens/base':>12} "
          f"{'token-layers/base':>18} {'seconds':>8}")
    print(f"{'baseline':<12} {b_step:>6} {b_tokens:>10,} {b_layers:>13,} {1.0:>12.3f} {1.0:>18.3f} "
          f"{base['seconds']:>8.1f}")
    for name, extra in runs.items():
        r = _run(name, extra, args, cfg, batches, held_out, target)
        if r["reached"] is None:
            last = r["curve"][-1]
            print(f"{name:<12} not reached in {int(args.steps * 1.5)} steps (held-out loss {last[1]:.4f} at "
                  f"step {last[0]}); tokens {r['tokens']:,}, token-layers {r['token_layers']:,}")
            continue
        step, tokens, layers, seconds = r["reached"]
        print(f"{name:<12} {step:>6} {tokens:>10,} {layers:>13,} {tokens / b_tokens:>12.3f} "
              f"{layers / b_layers:>18.3f} {seconds:>8.1f}")
    if not math.isfinite(target):
        raise SystemExit("the baseline's loss is not finite")


if __name__ == "__main__":
    main()
