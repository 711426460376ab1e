"""Activation checkpointing: saved-activation bytes and step time, with and without, in one run.

The model is a stack of ``torch.nn.TransformerEncoderLayer`` (pre-norm, GELU, dropout 0.1). Saved
bytes are measured with ``torch.autograd.graph.saved_tensors_hooks`` around the forward: every
distinct storage saved for backward, parameters excluded. Step time is the median of ``--steps``
forward+backward steps after one warm-up step, the variants interleaved step by step. On a device run the peak allocated memory is
printed too (``--offload`` adds the cpu_checkpointing variant there).

    python benchmarks/bench_activation_checkpointing.py [--layers 6 --hidden 128 --seq 64 --batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ds_core import checkpointing


def build(layers: int, hidden: int, heads: int, device: str) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.1, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(layers)
    ).to(device)


def step(model: nn.ModuleList, x: torch.Tensor, checkpointed: bool) -> tuple[int, float]:
    """One forward+backward; returns (saved-activation bytes, seconds)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for layer in model:
            h = checkpointing.checkpoint(layer, h) if checkpointed else layer(h)
        loss = h.float().square().mean()
    loss.backward()
    sync()
    return sum(saved.values()), time.perf_counter() - start


def measure(model, x, variants: dict[str, dict | None], steps: int) -> dict[str, dict[str, float]]:
    """Run the variants round-robin (so drifting machine load hits them alike); None = plain."""

    def one(options: dict | None) -> tuple[int, float, int]:
        if options is not None:
            checkpointing.configure(**options)
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        saved, seconds = step(model, x, options is not None)
        return saved, seconds, torch.cuda.max_memory_allocated() if x.is_cuda else 0

    for options in variants.values():
        one(options)  # warm-up: allocator growth, lazy imports
    samples: dict[str, list[tuple[int, float, int]]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, options in variants.items():
            samples[name].append(one(options))
    out = {}
    for name, rows in samples.items():
        out[name] = {"saved_bytes": rows[-1][0], "step_s": statistics.median(r[1] for r in rows)}
        if x.is_cuda:
            out[name]["peak_bytes"] = max(r[2] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offload", action="store_true", help="also run cpu_checkpointing (device runs)")
    args = parser.parse_args()

    model = build(args.layers, args.hidden, args.heads, args.device)
    x = torch.randn(args.batch, args.seq, args.hidden, device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} x TransformerEncoderLayer(d={args.hidden}, heads={args.heads}, "
          f"ff={4 * args.hidden}), {n_params / 1e6:.2f} M params, fp32; input {args.batch} x "
          f"{args.seq} x {args.hidden} on {args.device}; torch {torch.__version__}; "
          f"median of {args.steps} steps")

    variants: dict[str, dict | None] = {"plain": None, "checkpoint": {}}
    if args.offload and args.device != "cpu":
        variants["checkpoint+cpu"] = {"checkpoint_in_cpu": True}
    runs = measure(model, x, variants, args.steps)

    base = runs["plain"]
    for name, r in runs.items():
        line = (f"{name:>15}: saved {r['saved_bytes'] / 2**20:8.2f} MiB "
                f"({r['saved_bytes'] / base['saved_bytes']:.3f}x)  step {r['step_s'] * 1e3:8.1f} ms "
                f"({r['step_s'] / base['step_s']:.2f}x)")
        if "peak_bytes" in r:
            line += f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB ({r['peak_bytes'] / base['peak_bytes']:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
