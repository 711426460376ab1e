"""Triton kernels of ds-ops against their PyTorch baselines, measured in the same run.

On a CUDA device (with ``ds-ops[cuda]`` installed):

- fused Adam: one ``FusedAdam`` step (one launch over every tensor) against
  ``torch.optim.AdamW(fused=True)`` on the same fp32 parameters, and the bf16-model variant (fp32
  master + bf16 copy written in the same pass) against AdamW(fused) followed by a bf16 copy;
- blockwise int8/int4 quantize and dequantize: GB/s moved (input read + codes and absmax
  written, or the reverse) against the device's copy bandwidth (``clone`` of the same input,
  read + write), and against the ops' PyTorch default on the same device;
- LayerNorm/RMSNorm forward+backward against ``torch.nn.functional``.

Without CUDA it says the GPU numbers need a device and runs a small CPU sanity check of the
defaults (they run and agree with torch), printing the same ratios; it never fails for lack of one.

    python benchmarks/bench_triton.py [--numel 67108864 --tensors 64 --iters 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import timed_median as _time

from ds_ops import norm, quant
from ds_ops import triton as ds_triton
from ds_ops.fused_adam import FusedAdam


def _params(numel: int, tensors: int, device: str, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 100, (tensors,), generator=g).float()
    sizes = (sizes / sizes.sum() * numel).long().clamp_min(1).tolist()
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(device, dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
    return params


def bench_adam(numel: int, tensors: int, iters: int, device: str) -> None:
    ref_p, our_p = _params(numel, tensors, device), _params(numel, tensors, device)
    fused = device == "cuda"
    ref = torch.optim.AdamW(ref_p, lr=1e-3, weight_decay=0.01, fused=fused or None)
    ours = FusedAdam(our_p, lr=1e-3, weight_decay=0.01)
    t_ref, t_ours = _time(ref.step, iters, device), _time(ours.step, iters, device)
    gbs = numel * 4 * 7 / t_ours / 1e9  # p, m, v read+write, grad read
    name = "AdamW(fused=True)" if fused else "AdamW(foreach)"
    print(f"adam fp32   {numel:>11,} params in {tensors} tensors: ours {t_ours * 1e3:8.3f} ms ({gbs:6.1f} GB/s)  "
          f"{name} {t_ref * 1e3:8.3f} ms  speedup x{t_ref / t_ours:.2f}")

    low_p = _params(numel, tensors, device, torch.bfloat16)
    master = [torch.nn.Parameter(p.detach().float()) for p in low_p]
    for m, p in zip(master, low_p):
        m.grad = p.grad.float()
    ref = torch.optim.AdamW(master, lr=1e-3, weight_decay=0.01, fused=fused or None)

    def ref_step():
        ref.step()
        torch._foreach_copy_([p.data for p in low_p], [m.data for m in master])

    ours = FusedAdam(low_p, lr=1e-3, weight_decay=0.01)
    t_ref, t_ours = _time(ref_step, iters, device), _time(ours.step, iters, device)
    print(f"adam bf16 model + fp32 master: ours {t_ours * 1e3:8.3f} ms  {name} + copy {t_ref * 1e3:8.3f} ms  "
          f"speedup x{t_ref / t_ours:.2f}")


def bench_quant(numel: int, iters: int, device: str) -> None:
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    t_copy = _time(x.clone, iters, device)
    copy_gbs = 2 * x.nbytes / t_copy / 1e9
    print(f"copy bandwidth (clone of {x.nbytes / 2**20:.0f} MiB bf16): {copy_gbs:8.1f} GB/s")
    for bits in (8, 4):
        for block in (64, 256):
            q, absmax = torch.ops.ds_ops.quantize_blockwise(x, block, bits)
            moved = x.nbytes + q.nbytes + absmax.nbytes
            t_q = _time(lambda b=block, k=bits: torch.ops.ds_ops.quantize_blockwise(x, b, k), iters, device)
            t_d = _time(lambda b=block, k=bits, q=q, a=absmax: torch.ops.ds_ops.dequantize_blockwise(
                q, a, [numel], b, k, torch.bfloat16), iters, device)  # fmt: skip
            t_ref = _time(lambda b=block, k=bits: quant.quantize_blockwise_reference(x, b, k), max(iters // 4, 1),
                          device)  # fmt: skip
            q_gbs, d_gbs = moved / t_q / 1e9, moved / t_d / 1e9
            print(f"int{bits} block {block:>3}: quantize {q_gbs:8.1f} GB/s ({q_gbs / copy_gbs:5.2f} of copy, "
                  f"x{t_ref / t_q:6.2f} vs default)  dequantize {d_gbs:8.1f} GB/s ({d_gbs / copy_gbs:5.2f} of copy)")


def bench_norm(rows: int, hidden: int, iters: int, device: str) -> None:
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    cases = {
        "layer_norm": (lambda: norm.layer_norm(x, hidden, w, b), lambda: F.layer_norm(x, (hidden,), w, b)),
        "rms_norm": (lambda: norm.rms_norm(x, hidden, w, 1e-6), lambda: F.rms_norm(x, (hidden,), w, 1e-6)),
    }
    for name, (ours, ref) in cases.items():
        t_ours = _time(lambda f=ours: f().backward(dy), iters, device)
        t_ref = _time(lambda f=ref: f().backward(dy), iters, device)
        print(f"{name:<10} fwd+bwd {rows}x{hidden} bf16: ours {t_ours * 1e3:7.3f} ms  torch {t_ref * 1e3:7.3f} ms  "
              f"speedup x{t_ref / t_ours:.2f}")


def cpu_sanity(iters: int) -> None:
    """The defaults run and agree with torch on CPU (small sizes); ratios are for information only."""
    bench_adam(1 << 20, 16, iters, "cpu")
    ref_p, our_p = _params(4096, 4, "cpu"), _params(4096, 4, "cpu")
    torch.optim.AdamW(ref_p, lr=1e-3, weight_decay=0.01, foreach=False).step()
    FusedAdam(our_p, lr=1e-3, weight_decay=0.01).step()
    adam_err = max((a - b).abs().max().item() for a, b in zip(ref_p, our_p))
    x = torch.randn(1 << 20)
    for bits in (8, 4):
        qb = quant.quantize(x, 64, bits)
        err = (qb.dequantize() - x).abs().view(-1, 64).amax(dim=1)
        bound = quant.error_bound(qb.absmax, bits) + 1e-6 * qb.absmax  # stated in ds_ops.quant
        worst = (err / bound).max().item()
        print(f"int{bits} round trip (block 64): worst block error = {worst:.4f} x the bound "
              f"absmax/{2 * quant.QMAX[bits]} + 1e-6 absmax ({'holds' if worst <= 1 else 'VIOLATED'})")
    bench_norm(1024, 1024, iters, "cpu")
    print(f"FusedAdam default vs torch AdamW, one step: max |diff| {adam_err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 26, help="elements for Adam and quantize (GPU)")
    parser.add_argument("--tensors", type=int, default=64, help="tensors the Adam parameters are split into")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("The GPU benchmarks need a CUDA device; none here. CPU sanity check of the PyTorch defaults:")
        cpu_sanity(max(args.iters // 4, 3))
        return
    if not ds_triton.available():
        print(f"CUDA is here but the Triton kernels are not: {ds_triton.unavailable_reason()}")
        return
    print(f"device: {torch.cuda.get_device_name()}  triton: {ds_triton.status()}")
    bench_adam(args.numel, args.tensors, args.iters, "cuda")
    bench_quant(args.numel, args.iters, "cuda")
    bench_norm(8192, 4096, args.iters, "cuda")


if __name__ == "__main__":
    main()
