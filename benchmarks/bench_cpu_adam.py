"""CPU AdamW step: the ds_ops C++ kernel against torch.optim.AdamW(fused=True), in one run.

Three tables:

1. The plain step on 24M fp32 params (flat buffers, as ZeRO-Offload holds them).
2. Memory bandwidth measured here, two ways, and the step's achieved bandwidth as a share of each,
   counting the 28 bytes an AdamW step must move per param (read p, g, m, v = 16; write p, m, v = 12):
   - STREAM triad ``a = b + s*c`` on fp32, counted as STREAM counts it (3 x 4 = 12 bytes/element);
   - the *access-pattern ceiling*: a loop with AdamW's exact traffic (read 4 streams, write 3 back
     in place) and no arithmetic worth the name, built with the same compiler flags and thread pool
     as the kernel. This is the fastest any AdamW step over these buffers can go on this machine.
3. The ZeRO-Offload update: unscale/clip the gradient by a coefficient, step, and copy the new
   params to bf16 — one fused call (``grad_scale=`` + ``param_copy=``) against the same recipe on
   torch (``grad.mul_(coef)``, ``AdamW(fused=True).step()``, ``.copy_()`` to bf16).

    python benchmarks/bench_cpu_adam.py [--params 24000000] [--threads 2] [--reps 15]

Timings are interleaved (every variant once per round) and the median is reported, so a noisy
neighbour hits all of them alike. The ceiling kernel is JIT-built on first run (~30 s, cached).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils import cpp_extension

from ds_ops import build, registry

_CEILING_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// AdamW's memory traffic with trivial arithmetic: read p, g, m, v; write p, m, v in place.
void same_traffic(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v) {
  float* P = p.data_ptr<float>(); const float* G = g.data_ptr<float>();
  float* M = m.data_ptr<float>(); float* V = v.data_ptr<float>();
  at::parallel_for(0, p.numel(), 1 << 15, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      float gi = G[i];
      P[i] = P[i] + gi; M[i] = M[i] + gi; V[i] = V[i] + gi;
    }
  });
}
"""


def _ceiling_kernel():
    return cpp_extension.load_inline(
        name="ds_bench_adam_traffic", cpp_sources=_CEILING_SRC, functions=["same_traffic"],
        extra_cflags=["-O3", "-fopenmp", *build.isa_flags()], extra_ldflags=["-fopenmp"], verbose=False)


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
    ceiling = _ceiling_kernel()
    n = args.params
    lr, betas, eps, wd, coef = 1e-3, (0.9, 0.999), 1e-8, 0.01, 0.5
    g = torch.Generator().manual_seed(0)

    # ours: flat buffers, as ZeRO-Offload holds them
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.zeros(n), torch.zeros(n)
    copy = torch.empty(n, dtype=torch.bfloat16)
    step = [0]

    def ours(out=None, scale=1.0):
        step[0] += 1
        torch.ops.ds_ops.adam_step(p, grad, m, v, out, lr, *betas, eps, wd, step[0], True, scale)

    # baseline: torch's fused CPU AdamW on one flat parameter
    tp = torch.nn.Parameter(torch.randn(n, generator=g))
    tp.grad = torch.randn(n, generator=g)
    topt = torch.optim.AdamW([tp], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=True)
    tcopy = torch.empty(n, dtype=torch.bfloat16)

    def torch_with_cast():
        topt.step()
        tcopy.copy_(tp.detach())

    def torch_offload_update():
        tp.grad.mul_(coef)
        topt.step()
        tcopy.copy_(tp.detach())

    a, b, c = torch.empty(n), torch.randn(n, generator=g), torch.randn(n, generator=g)
    q, h, r, s = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n)
    variants = {
        "ours": ours,
        "torch": topt.step,
        "triad": lambda: torch.add(b, c, alpha=3.0, out=a),
        "ceiling": lambda: ceiling.same_traffic(q, h, r, s),
        "ours_bf16": lambda: ours(copy),
        "torch_bf16": torch_with_cast,
        "ours_offload": lambda: ours(copy, coef),
        "torch_offload": torch_offload_update,
    }
    for fn in variants.values():
        fn(), fn()  # warm up: page in the buffers, create optimizer state
    t = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, fn in variants.items():
            t[k].append(_time(fn))
    med = {k: statistics.median(x) for k, x in t.items()}
    best = {k: min(x) for k, x in t.items()}

    def row(label: str, key: str) -> None:
        print(f"  {label:<38}{med[key] * 1e3:8.2f} ms ({best[key] * 1e3:.2f})")

    def ratio(label: str, base: str, new: str) -> None:
        print(f"  {label:<38}{med[base] / med[new]:8.2f}x ({best[base] / best[new]:.2f}x best/best)")

    print(f"AdamW step, {n / 1e6:.1f}M fp32 params, {args.threads} threads, torch {torch.__version__}, "
          f"ISA {build.cpu_isa()}, median (best) of {args.reps}")
    row("ds_ops adam_step (C++)", "ours")
    row("torch.optim.AdamW(fused=True)", "torch")
    ratio("speedup", "torch", "ours")

    gbs = {k: nbytes * n / med[k] / 1e9 for k, nbytes in
           (("triad", 12), ("ceiling", 28), ("ours", 28), ("torch", 28))}
    print("Memory bandwidth on this machine (same run)")
    print(f"  {'STREAM triad a=b+s*c (12 B/elem fp32)':<38}{gbs['triad']:8.1f} GB/s")
    print(f"  {'AdamW traffic, no math (28 B/elem)':<38}{gbs['ceiling']:8.1f} GB/s  <- ceiling for any AdamW")
    for who in ("ours", "torch"):
        label = f"{'ds_ops' if who == 'ours' else 'torch'} achieved (28 B/param)"
        print(f"  {label:<38}{gbs[who]:8.1f} GB/s = {100 * gbs[who] / gbs['ceiling']:.0f}% of ceiling, "
              f"{100 * gbs[who] / gbs['triad']:.0f}% of triad")

    print("AdamW step + bf16 copy of the params")
    row("ds_ops adam_step, fused copy", "ours_bf16")
    row("AdamW(fused) + separate cast", "torch_bf16")
    ratio("speedup", "torch_bf16", "ours_bf16")
    print(f"ZeRO-Offload update: grad x {coef} (unscale/clip) + AdamW step + bf16 copy")
    row("ds_ops adam_step(grad_scale, copy)", "ours_offload")
    row("grad.mul_ + AdamW(fused) + cast", "torch_offload")
    ratio("speedup", "torch_offload", "ours_offload")


if __name__ == "__main__":
    main()
