"""CPU AdamW step: the ds_ops C++ kernel against torch.optim.AdamW(fused=True), in one run.

Also measures this machine's memory bandwidth with a STREAM-style triad (a = b + s*c, counted as
24 bytes/element as STREAM does) and reports the kernel's achieved bandwidth, counting the 28 bytes
an AdamW step must move per param (read p, g, m, v = 16; write p, m, v = 12), as a % of it. The
second table is the ZeRO-Offload variant: the step plus a bf16 copy of the new params, fused in our
kernel vs AdamW followed by a separate cast.

    python benchmarks/bench_cpu_adam.py [--params 24000000] [--threads 2] [--reps 15]

Timings are interleaved (ours, baseline, triad in turn) and the median is reported, so a noisy
neighbour hits all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ds_ops import build, registry


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=24_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry.register()
    build.load("cpu_optim")  # build outside the timed region
    n = args.params
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    g = torch.Generator().manual_seed(0)

    # ours: flat buffers, as ZeRO-Offload holds them
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.zeros(n), torch.zeros(n)
    copy = torch.empty(n, dtype=torch.bfloat16)
    step = [0]

    def ours(out=None):
        step[0] += 1
        torch.ops.ds_ops.adam_step(p, grad, m, v, out, lr, *betas, eps, wd, step[0], True)

    # baseline: torch's fused CPU AdamW on one flat parameter
    tp = torch.nn.Parameter(torch.randn(n, generator=g))
    tp.grad = torch.randn(n, generator=g)
    topt = torch.optim.AdamW([tp], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=True)
    tcopy = torch.empty(n, dtype=torch.bfloat16)

    def baseline_with_cast():
        topt.step()
        tcopy.copy_(tp.detach())

    a, b, c = torch.empty(n), torch.randn(n, generator=g), torch.randn(n, generator=g)

    def triad():
        torch.add(b, c, alpha=3.0, out=a)

    for fn in (ours, topt.step, triad, lambda: ours(copy), baseline_with_cast):
        fn(), fn()  # warm up: page in the buffers, create optimizer state
    t = {k: [] for k in ("ours", "torch", "triad", "ours_bf16", "torch_bf16")}
    for _ in range(args.reps):
        t["ours"].append(_time(ours))
        t["torch"].append(_time(topt.step))
        t["triad"].append(_time(triad))
        t["ours_bf16"].append(_time(lambda: ours(copy)))
        t["torch_bf16"].append(_time(baseline_with_cast))
    med = {k: statistics.median(x) for k, x in t.items()}
    best = {k: min(x) for k, x in t.items()}

    print(f"AdamW step, {n / 1e6:.1f}M fp32 params, {args.threads} threads, torch {torch.__version__}, "
          f"ISA {build.cpu_isa()}, median (best) of {args.reps}")
    print(f"  ds_ops adam_step (C++)          {med['ours'] * 1e3:8.2f} ms ({best['ours'] * 1e3:.2f})")
    print(f"  torch.optim.AdamW(fused=True)   {med['torch'] * 1e3:8.2f} ms ({best['torch'] * 1e3:.2f})")
    print(f"  speedup                         {med['torch'] / med['ours']:8.2f}x ({best['torch'] / best['ours']:.2f}x)")
    triad_bw = 24 * n / med["triad"]
    triad_best = 24 * n / best["triad"]
    ours_bw, ours_best = 28 * n / med["ours"], 28 * n / best["ours"]
    torch_bw = 28 * n / med["torch"]
    print(f"  triad bandwidth                 {triad_bw / 1e9:8.1f} GB/s ({triad_best / 1e9:.1f})")
    print(f"  ds_ops achieved (28 B/param)    {ours_bw / 1e9:8.1f} GB/s = {100 * ours_bw / triad_bw:.0f}% of "
          f"triad (best/best {100 * ours_best / triad_best:.0f}%)")
    print(f"  torch achieved (28 B/param)     {torch_bw / 1e9:8.1f} GB/s = {100 * torch_bw / triad_bw:.0f}% of triad")
    print("AdamW step + bf16 copy of the params (ZeRO-Offload)")
    print(f"  ds_ops adam_step, fused copy    {med['ours_bf16'] * 1e3:8.2f} ms ({best['ours_bf16'] * 1e3:.2f})")
    print(f"  AdamW(fused) + separate cast    {med['torch_bf16'] * 1e3:8.2f} ms ({best['torch_bf16'] * 1e3:.2f})")
    print(f"  speedup                         {med['torch_bf16'] / med['ours_bf16']:8.2f}x "
          f"({best['torch_bf16'] / best['ours_bf16']:.2f}x)")


if __name__ == "__main__":
    main()
