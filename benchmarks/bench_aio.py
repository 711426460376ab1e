"""NVMe-offload I/O: ds_ops aio against numpy tofile/fromfile and dd, on the same file system.

Writes then reads 1 GiB of fp32 tensors (4 x 256 MiB by default) in a temp dir (default under
/tmp, removed afterwards). Every write ends durable (fdatasync for all three), and before every read
the file's pages are dropped from the page cache (posix_fadvise DONTNEED), so reads come from the
device for all three.

    python benchmarks/bench_aio.py [--dir /tmp] [--gib 1] [--files 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ds_ops import aio, build, registry


def _drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=1 << 20)
    parser.add_argument("--queue-depth", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--buffered", action="store_true", help="do not use O_DIRECT in ds_ops aio")
    args = parser.parse_args()
    registry.register()
    build.load("aio")
    total = int(args.gib * (1 << 30))
    per = total // args.files // 4
    tensors = [torch.randn(per) for _ in range(args.files)]
    outs = [torch.empty_like(t) for t in tensors]
    nbytes = sum(t.nbytes for t in tensors)
    engine = aio.AsyncIO({"block_size": args.block_size, "queue_depth": args.queue_depth,
                          "thread_count": args.threads}, direct=not args.buffered)
    root = Path(tempfile.mkdtemp(prefix="ds-bench-aio-", dir=args.dir))
    try:
        ours_p = [root / f"ours{i}.bin" for i in range(args.files)]
        np_p = [root / f"np{i}.bin" for i in range(args.files)]
        dd_p = [root / f"dd{i}.bin" for i in range(args.files)]

        def ours_write():
            for h in [engine.write(t, p, fsync=True) for t, p in zip(tensors, ours_p)]:
                h.wait()

        def ours_read():
            for h in [engine.read(o, p) for o, p in zip(outs, ours_p)]:
                h.wait()

        def np_write():
            for t, p in zip(tensors, np_p):
                t.numpy().tofile(p)
                fd = os.open(p, os.O_RDONLY)
                os.fdatasync(fd)
                os.close(fd)

        def np_read():
            for p in np_p:
                np.fromfile(p, dtype=np.float32)

        mib = per * 4 // (1 << 20)

        def dd_write():
            for p in dd_p:
                subprocess.run(["dd", "if=/dev/zero", f"of={p}", "bs=1M", f"count={mib}", "conv=fdatasync"],
                               check=True, capture_output=True)

        def dd_read():
            for p in dd_p:
                subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=1M", "iflag=direct"],
                               check=True, capture_output=True)

        results: dict[str, list[float]] = {k: [] for k in
                                           ("ours_w", "np_w", "dd_w", "ours_r", "np_r", "dd_r")}
        for _ in range(args.reps):
            results["ours_w"].append(_time(ours_write))
            results["np_w"].append(_time(np_write))
            results["dd_w"].append(_time(dd_write))
            _drop_cache(ours_p + np_p + dd_p)
            results["ours_r"].append(_time(ours_read))
            results["np_r"].append(_time(np_read))
            results["dd_r"].append(_time(dd_read))
        assert all(torch.equal(a, b) for a, b in zip(tensors, outs)), "read back differs"
        gbs = {k: nbytes / statistics.median(v) / 1e9 for k, v in results.items()}
        print(f"{nbytes / (1 << 30):.2f} GiB in {args.files} files under {args.dir}, median of {args.reps}; "
              f"aio {'buffered' if args.buffered else 'O_DIRECT'}, block {args.block_size >> 10} KiB, queue depth {args.queue_depth}, threads {args.threads}")
        for kind, label in (("w", "write (durable)"), ("r", "read (cold cache)")):
            ours = gbs[f"ours_{kind}"]
            print(f"  {label}")
            print(f"    ds_ops aio                  {ours:6.2f} GB/s")
            print(f"    numpy tofile/fromfile       {gbs[f'np_{kind}']:6.2f} GB/s   ratio {ours / gbs[f'np_{kind}']:.2f}x")
            print(f"    dd (fdatasync / O_DIRECT)   {gbs[f'dd_{kind}']:6.2f} GB/s   ratio {ours / gbs[f'dd_{kind}']:.2f}x")
    finally:
        engine.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
