"""Low-precision training state: bytes per parameter, step time and final loss, against fp32 masters.

    python benchmarks/bench_precision.py [--steps 40] [--dim 64] [--layers 2] [--stages 0 2]

Same GPT, same data, 2 gloo ranks, same run. For each ZeRO stage, each setting trains ``--steps``
optimizer steps from the same weights; printed per setting:

- bytes per parameter held by this rank between steps, counted from the tensors themselves: the
  model's weights, separate master weights, gradient accumulation buffers and optimizer state (ZeRO-2
  divides the last three by the data-parallel size; its reduce buckets, a fixed size, are left out);
- the median step time after 3 warm-up steps;
- the final loss (mean of the last 5 steps) and its distance to the baseline's;
- ratios to the baseline: bf16 model with fp32 masters, gradients and state (DeepSpeed's default).

"nearest" is bf16 masters updated with round-to-nearest instead of stochastic rounding, to show what
the rounding is for.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

import ds_core
from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

SETTINGS = {
    "bf16, fp32 masters (baseline)": {"bf16": {"enabled": True}},
    "bf16 masters+grads": {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
    "bf16 masters+grads+state": {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                          "bf16_optimizer_states": True}},
    "  same, nearest rounding": {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                          "bf16_optimizer_states": True},
                                 "data_types": {"master_weights_rounding": "nearest"}},
    "fp32": {},
    "fp32, grad_accum_dtype bf16": {"data_types": {"grad_accum_dtype": "bf16"}},
}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds between steps: weights, separate masters, gradient buffers, optimizer state."""
    s = engine.strategy
    out = {"weights": _nbytes(list(engine.module.parameters()))}
    zero = getattr(s, "zero", None)
    if zero is None:  # stage 0
        out["masters"] = _nbytes([s.flat_master]) if hasattr(s, "flat_master") else 0
        out["grads"] = _nbytes([s.grads.buffer])
    else:
        out["masters"] = 0 if zero.aliased else _nbytes(zero.masters)
        grads = getattr(s.reducer, "grads", None)
        held = [grads.buffer] if hasattr(grads, "buffer") else list(grads)  # stage 1: full buffer; 2: partitions
        if zero.offload:
            held += zero.grads if zero.low_precision is not None else [m.grad for m in zero.masters]
        out["grads"] = _nbytes(held)
    out["state"] = _nbytes([v for st in s.optimizer.state.values() for v in st.values() if torch.is_tensor(v)])
    return out


def _bench(steps: int, dim: int, layers: int, micro: int, stages: list[int], lr: float):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=32, dim=dim, layers=layers, heads=2)
    rank = dist.get_rank()
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, rank) for i in range(steps)]
    base = GPT(cfg)
    params = sum(p.numel() for p in base.parameters())
    results = {}
    for stage in stages:
        for name, over in SETTINGS.items():
            config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
                      "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}, **over}
            if stage:
                config["zero_optimization"] = {"stage": stage}
            engine = ds_core.initialize(model=copy.deepcopy(base), config=config)[0]
            losses, times = [], []
            for i in range(steps):
                x, y = batches[i]
                dist.barrier()
                start = time.perf_counter()
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
            mem = state_bytes(engine)
            results[(stage, name)] = (mem, statistics.median(times[3:]), sum(losses[-5:]) / 5)
            engine.destroy()
    return params, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    params, r = run_distributed(_bench, 2, args=(args.steps, args.dim, args.layers, args.micro, args.stages,
                                                 args.lr), timeout=3600)[0]
    print(f"GPT {params / 1e6:.3f} M parameters, 2 gloo ranks, AdamW lr {args.lr}, micro-batch {args.micro}, "
          f"{args.steps} steps; bytes per parameter on one rank between steps")
    head = (f"{'stage':<6}{'setting':<32}{'weights':>8}{'masters':>8}{'grads':>7}{'state':>7}{'total':>7}"
            f"{'ratio':>7}{'ms/step':>9}{'ratio':>7}{'loss':>9}{'Δ loss':>9}")
    print(head)
    for stage in args.stages:
        base_mem, base_t, base_loss = r[(stage, next(iter(SETTINGS)))]
        base_total = sum(base_mem.values())
        for name in SETTINGS:
            mem, t, loss = r[(stage, name)]
            total = sum(mem.values())
            per = {k: v / params for k, v in mem.items()}
            print(f"{stage:<6}{name:<32}{per['weights']:>8.2f}{per['masters']:>8.2f}{per['grads']:>7.2f}"
                  f"{per['state']:>7.2f}{total / params:>7.2f}{total / base_total:>7.3f}{t * 1e3:>9.1f}"
                  f"{t / base_t:>7.2f}{loss:>9.4f}{loss - base_loss:>+9.4f}")


if __name__ == "__main__":
    main()
