"""One GPU proof: every CUDA test, every Triton kernel compiled and checked, the GPU benchmarks.

    python benchmarks/gpu/run.py [--out DIR] [--budget SECONDS] [--dry-run]

Built for a GPU machine that has torch + CUDA, Triton, transformers and safetensors but no network
and no pydantic: ``benchmarks/gpu/prepare.py`` (run where pip works) puts pydantic's wheels and
wheels of our packages in ``.whl/``; on the GPU machine

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu/run.py --out results/

installs nothing else and uses that interpreter. In order, each step bounded in time:

1. ``pytest -m cuda tests`` with ``TRITON_INTERPRET=0``: the CUDA tests of every package, which
   compile each Triton kernel for the device and compare it with its PyTorch reference;
2. benchmarks, each printed as ours / baseline measured in the same run: the fused Adam kernel vs
   ``torch.optim.AdamW(fused=True)``; quantize/dequantize bandwidth vs a device copy; LayerNorm /
   RMSNorm fwd+bwd vs torch; the engine's bf16 step vs a plain PyTorch autocast loop on a ~1B GPT
   (overhead, tokens/s, MFU); ZeRO-3 with CPU parameter + optimizer offload vs FSDP2 with
   ``CPUOffloadPolicy`` at world size 1; and the inference and serving rows of the packages
   installed (:mod:`gpu_infer`);
3. ``results.json`` and ``results.md`` (device, torch, Triton, CUDA versions, every row) in ``--out``.

Without a CUDA device (or with ``--dry-run``) it says so, checks that the CUDA tests collect and are
skipped with a reason, builds every benchmark model at a tiny size and runs one step of each on
the CPU, writes the same files, and exits 0 — so the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import timed_median  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's datasheet figure for dense bf16 on an H200 SXM


@dataclass
class Row:
    section: str
    name: str
    ours: float | None = None
    baseline: float | None = None
    unit: str = ""
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline in (None, 0):
            return None
        return self.ours / self.baseline


@dataclass
class Report:
    env: dict
    rows: list[Row] = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        ratio = f"  ratio {row.ratio:.3f}" if row.ratio is not None else ""
        base = f"  {row.baseline_name} {row.baseline:.4g}" if row.baseline is not None else ""
        ours = f"{row.ours:.4g}" if row.ours is not None else "-"
        print(f"[gpu] {row.section:<10} {row.name:<44} ours {ours} {row.unit}{base}{ratio}"
              f"{'  (' + row.note + ')' if row.note else ''}", flush=True)


def environment(dry: bool) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "dry_run": dry}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal
        env["triton"] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["device"] = "cpu (no CUDA device visible)"
    return env


# --- 1. the CUDA tests ----------------------------------------------------------------------------


def run_cuda_tests(report: Report, out: Path, dry: bool, timeout: float) -> None:
    """``pytest -m cuda`` over every package's tests; on a machine without CUDA, check that they
    collect and are all skipped with a reason."""
    junit = out / "cuda-tests.xml"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", str(ROOT / "tests"), "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "addopts="]
    print(f"[gpu] tests: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        report.errors.append(f"cuda tests did not finish within {timeout:.0f} s")
        (out / "cuda-tests.log").write_text((exc.stdout or b"").decode() if isinstance(exc.stdout, bytes)
                                            else (exc.stdout or ""))
        return
    (out / "cuda-tests.log").write_text(proc.stdout + proc.stderr)
    print("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]), flush=True)
    cases = _junit_cases(junit)
    counts = {k: sum(1 for c in cases if c["outcome"] == k) for k in ("passed", "failed", "skipped")}
    report.tests = {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                    **counts, "cases": cases}
    if dry:
        if counts["passed"] or counts["failed"]:
            report.errors.append("without a CUDA device every cuda test must be skipped with a reason")
        if not counts["skipped"]:
            report.errors.append("no cuda tests were collected: mark the CUDA tests `@pytest.mark.cuda`")
    elif proc.returncode != 0:
        failed = [c["name"] for c in cases if c["outcome"] == "failed"]
        report.errors.append(f"cuda tests failed (exit {proc.returncode}): {', '.join(failed) or 'see the log'}")


def _junit_cases(path: Path) -> list[dict]:
    if not path.exists():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return cases


# --- 2. benchmarks --------------------------------------------------------------------------------


def bench_kernels(report: Report, device: str, dry: bool) -> None:
    """Fused Adam, blockwise quantization and norms against their torch baselines."""
    import torch.nn.functional as F

    from ds_ops import norm, quant
    from ds_ops.fused_adam import FusedAdam

    numel, tensors, iters = (1 << 14, 4, 2) if dry else (1 << 26, 64, 20)
    g = torch.Generator().manual_seed(0)
    sizes = (torch.rand(tensors, generator=g) + 0.1)
    sizes = (sizes / sizes.sum() * numel).long().clamp_min(1).tolist()

    def params(dtype=torch.float32):
        ps = [torch.nn.Parameter(torch.randn(n, device=device).to(dtype)) for n in sizes]
        for p in ps:
            p.grad = torch.randn(p.shape, device=device).to(dtype)
        return ps

    fused = device == "cuda"
    ref = torch.optim.AdamW(params(), lr=1e-3, weight_decay=0.01, fused=fused or None)
    ours = FusedAdam(params(), lr=1e-3, weight_decay=0.01)
    t_ref, t_ours = timed_median(ref.step, iters, device), timed_median(ours.step, iters, device)
    report.add(Row("kernels", f"Adam fp32 step, {sum(sizes) / 1e6:.1f}M params", t_ours * 1e3, t_ref * 1e3, "ms",
                   "AdamW(fused=True)" if fused else "AdamW",
                   f"{sum(sizes) * 4 * 7 / t_ours / 1e9:.0f} GB/s moved"))

    if device == "cuda" or dry:  # the launch shape, swept: what the default should be on this device
        from ds_ops.triton import adam

        ps = params()
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        grid = [(4096, 1024, 4)] if dry else [(c, b, w) for c in (65536, 16384, 4096) for b in (1024, 2048)
                                              for w in (4, 8)]
        hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        swept = {cfg: timed_median(lambda c=cfg: adam.fused_adam_launch(
            ps, [p.grad for p in ps], ms, vs, [], 1, **hp, chunk=c[0], block=c[1], num_warps=c[2]),
            iters, device) for cfg in grid}
        best = min(swept, key=swept.get)
        default = (adam.CHUNK, adam.BLOCK, adam.NUM_WARPS)
        report.add(Row("kernels", f"Adam launch sweep: best chunk/block/warps {best}", swept[best] * 1e3,
                       swept.get(default, t_ours) * 1e3, "ms", f"default {default}",
                       "; ".join(f"{k}: {v * 1e3:.3f}" for k, v in sorted(swept.items()))))
        del ps, ms, vs

    low = params(torch.bfloat16)
    master = [torch.nn.Parameter(p.detach().float()) for p in low]
    for m, p in zip(master, low):
        m.grad = p.grad.float()
    ref = torch.optim.AdamW(master, lr=1e-3, weight_decay=0.01, fused=fused or None)

    def ref_step():
        ref.step()
        torch._foreach_copy_([p.data for p in low], [m.data for m in master])

    ours = FusedAdam(low, lr=1e-3, weight_decay=0.01)
    t_ref, t_ours = timed_median(ref_step, iters, device), timed_median(ours.step, iters, device)
    report.add(Row("kernels", "Adam bf16 model + fp32 master (fused copy-out)", t_ours * 1e3, t_ref * 1e3, "ms",
                   "AdamW(fused) + copy"))

    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    t_copy = timed_median(x.clone, iters, device)
    for bits in (8, 4):
        q, absmax = torch.ops.ds_ops.quantize_blockwise(x, 64, bits)
        moved = x.nbytes + q.nbytes + absmax.nbytes
        t_q = timed_median(lambda b=bits: torch.ops.ds_ops.quantize_blockwise(x, 64, b), iters, device)
        t_d = timed_median(lambda b=bits, q=q, a=absmax: torch.ops.ds_ops.dequantize_blockwise(
            q, a, [numel], 64, b, torch.bfloat16), iters, device)
        report.add(Row("kernels", f"quantize int{bits} block 64 (GB/s)", moved / t_q / 1e9, 2 * x.nbytes / t_copy / 1e9,
                       "GB/s", "device copy"))
        report.add(Row("kernels", f"dequantize int{bits} block 64 (GB/s)", moved / t_d / 1e9,
                       2 * x.nbytes / t_copy / 1e9, "GB/s", "device copy"))
        _ = quant  # the op module registers the kernels

    rows, hidden = (64, 256) if dry else (8192, 4096)
    xs = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(xs)
    cases = {"LayerNorm": (lambda: norm.layer_norm(xs, hidden, w, b), lambda: F.layer_norm(xs, (hidden,), w, b)),
             "RMSNorm": (lambda: norm.rms_norm(xs, hidden, w, 1e-6), lambda: F.rms_norm(xs, (hidden,), w, 1e-6))}
    for name, (mine, theirs) in cases.items():
        t_ours = timed_median(lambda f=mine: f().backward(dy), iters, device)
        t_ref = timed_median(lambda f=theirs: f().backward(dy), iters, device)
        report.add(Row("kernels", f"{name} fwd+bwd {rows}x{hidden} bf16", t_ours * 1e3, t_ref * 1e3, "ms", "torch"))


def gpt_config(dry: bool):
    from ds_core.testing.models import GPTConfig

    if dry:
        return GPTConfig(vocab_size=512, seq_len=64, dim=64, layers=2, heads=4), 2
    # ~1.07B parameters: 20 blocks of 12·d² plus 65M of embeddings
    return GPTConfig(vocab_size=32000, seq_len=1024, dim=2048, layers=20, heads=16), 8


def flops_per_token(cfg, n_params: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls plus 12·L·d·T for attention (PaLM, appendix B)."""
    return 6 * n_params + 12 * cfg.layers * cfg.dim * cfg.seq_len


def _init_single_rank(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def bench_engine(report: Report, device: str, dry: bool) -> None:
    """The engine's bf16 step (fp32 masters, AdamW, clipping) vs a plain PyTorch loop doing the same
    training (autocast bf16 over fp32 weights, fused AdamW, clipping), on one device."""
    import ds_core
    from ds_core.testing.models import GPT, synthetic_tokens

    cfg, micro = gpt_config(dry)
    steps = 2 if dry else 10
    batches = [tuple(t.to(device) for t in synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i))
               for i in range(4)]
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda" or None)

    def plain(i):
        x, y = batches[i % len(batches)]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_plain = _timed_steps(plain, steps, device)
    model = opt = None  # free the baseline before ours is built
    _free(device)

    _init_single_rank(device)
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    engine = ds_core.initialize(model=GPT(cfg), config=config)[0]

    def ds_step(i):
        x, y = batches[i % len(batches)]
        engine.backward(engine(x, y))
        engine.step()

    t_ds = _timed_steps(ds_step, steps, device)
    tokens = micro * cfg.seq_len
    peak = H200_BF16_DENSE_TFLOPS * 1e12
    mfu = flops_per_token(cfg, n_params) * tokens / t_ds / peak
    report.add(Row("engine", f"bf16 step, GPT {n_params / 1e9:.2f}B, {micro}x{cfg.seq_len} tokens",
                   t_ds * 1e3, t_plain * 1e3, "ms", "PyTorch autocast loop",
                   f"{tokens / t_ds:,.0f} tokens/s, MFU {mfu:.1%} of {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s"))
    if hasattr(engine, "destroy"):
        engine.destroy()
    engine = None
    _free(device)


def bench_zero3_offload(report: Report, device: str, dry: bool) -> None:
    """ZeRO-3 with parameters and optimizer state offloaded to the CPU vs FSDP2 with CPUOffloadPolicy,
    world size 1, same GPT, bf16 compute with fp32 masters on both sides."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    import ds_core
    from ds_core.testing.models import GPT, synthetic_tokens

    _init_single_rank(device)
    cfg, micro = gpt_config(dry)
    micro = max(1, micro // 2)
    steps = 2 if dry else 3
    batches = [tuple(t.to(device) for t in synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i))
               for i in range(4)]

    torch.manual_seed(0)
    model = GPT(cfg)
    mesh = init_device_mesh(device, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device == "cuda")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, offload_policy=offload, mp_policy=mp)
    fully_shard(model, mesh=mesh, offload_policy=offload, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def fsdp(i):
        x, y = batches[i % len(batches)]
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_fsdp = _timed_steps(fsdp, steps, device, warmup=1)
    model = opt = None  # free the baseline before ours is built
    _free(device)

    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                    "offload_optimizer": {"device": "cpu"}}}
    engine = ds_core.initialize(model=GPT(cfg), config=config)[0]

    def ds_step(i):
        x, y = batches[i % len(batches)]
        engine.backward(engine(x, y))
        engine.step()

    t_ds = _timed_steps(ds_step, steps, device, warmup=1)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    report.add(Row("zero3", f"stage 3 + CPU offload (params, optimizer), {micro}x{cfg.seq_len}", t_ds * 1e3,
                   t_fsdp * 1e3, "ms", "FSDP2 + CPUOffloadPolicy", f"GPT {n_params / 1e9:.2f}B, world size 1"))
    if hasattr(engine, "destroy"):
        engine.destroy()
    engine = None
    _free(device)


def _timed_steps(step, steps: int, device: str, warmup: int = 2) -> float:
    for i in range(warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - start) / steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- 3. results ------------------------------------------------------------------------------------


def write_results(report: Report, out: Path) -> None:
    rows = [{**asdict(r), "ratio": r.ratio} for r in report.rows]
    tests = {k: v for k, v in report.tests.items() if k != "cases"}
    data = {"env": report.env, "tests": report.tests, "rows": rows, "errors": report.errors}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    env = report.env
    lines = [f"# GPU results, {env['date']}", "",
             f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env.get('triton')}, "
             f"Python {env['python']}{' — DRY RUN on CPU, tiny sizes: no figure here is a GPU figure' if env['dry_run'] else ''}.",
             "", f"CUDA tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
             f"{tests.get('skipped', 0)} skipped in {tests.get('seconds', 0)} s.", "",
             "| section | what | ours | baseline | ours / baseline | note |", "|---|---|---|---|---|---|"]
    for r in report.rows:
        ours = f"{r.ours:.4g} {r.unit}" if r.ours is not None else "–"
        base = f"{r.baseline:.4g} {r.unit} ({r.baseline_name})" if r.baseline is not None else "–"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "–"
        lines.append(f"| {r.section} | {r.name} | {ours} | {base} | {ratio} | {r.note} |")
    failed = [c for c in report.tests.get("cases", []) if c["outcome"] == "failed"]
    if failed:
        lines += ["", "Failed CUDA tests:", ""] + [f"- `{c['name']}`: {c['message']}" for c in failed]
    if report.errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in report.errors]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


SECTIONS = {"kernels": bench_kernels, "engine": bench_engine, "zero3": bench_zero3_offload}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu"),
                        help="folder for results.json, results.md and the test log ($OUT if set)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 8 min)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU even if a GPU is here")
    parser.add_argument("--only", nargs="*", help="run only these steps (tests, kernels, engine, zero3, infer, serve)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("[gpu] no CUDA device here: dry run (tiny models on the CPU; the cuda tests must all skip). "
              "Run this on a GPU machine for the figures.", flush=True)
    device = "cpu" if dry else "cuda"
    if dry:  # Triton kernels can only be interpreted on the CPU; Triton reads this when first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(environment(dry))
    print(f"[gpu] {json.dumps(report.env)}", flush=True)

    import gpu_infer

    steps = {"tests": None, **SECTIONS, **gpu_infer.SECTIONS}
    wanted = args.only or list(steps)
    for name in wanted:
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            report.errors.append(f"step {name} not run: the {args.budget:.0f} s budget was spent")
            continue
        t0 = time.perf_counter()
        try:
            if name == "tests":
                run_cuda_tests(report, out, dry, timeout=min(left - 10, 240))
            else:
                steps[name](report, device, dry)
        except Exception as exc:  # one broken step must not hide the others' figures
            report.errors.append(f"step {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            _free(device)
        print(f"[gpu] step {name} took {time.perf_counter() - t0:.1f} s", flush=True)
    write_results(report, out)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
