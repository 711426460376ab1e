"""ZeRO stage 3 step time and peak memory vs PyTorch FSDP2 (``fully_shard``) on the same GPT, and
stage 3 with CPU offload and with NVMe offload (ZeRO-Infinity) of parameters and optimizer state.

    python benchmarks/bench_zero3.py [--steps 10] [--rounds 3] [--dim 384] [--layers 6] [--nvme-path DIR]

Same GPT, same data, 2 gloo ranks with one thread each. Every loop does forward, backward
(gradients reduce-scattered), clipping at 1.0 and AdamW. FSDP2 shards with one ``fully_shard`` call
per transformer block plus one for the root (its recommended wrapping); ds stage 3 gathers each
module's own parameters around its forward and backward, with ``overlap_comm`` and the default
persistence threshold. Timings alternate (FSDP2, stage 3, FSDP2, ...) in one run so machine noise
hits both; the ratio of medians is printed. Peak memory is each configuration's peak resident set
size per rank (``ru_maxrss``) in a fresh pair of processes running 3 steps, minus the RSS before the
model is built — on a CPU machine the closest measure of the memory a rank needed.

The offload rows are printed as ratios to plain stage 3. CPU offload keeps parameter shards, fp32
masters and Adam state in host memory; NVMe offload keeps them in swap files under ``--nvme-path``
(default: a temporary directory on the disk holding ``/tmp``), stepping the optimizer in sub-groups
of ``SUB_GROUP`` elements so reads and writes overlap the step. The page cache is not part of RSS.
"""

from __future__ import annotations

import argparse
import copy
import resource
import shutil
import statistics
import tempfile

import torch
import torch.distributed as dist
from _common import engine_step, timed, torch_step

from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

LR, CLIP = 1e-4, 1.0
SUB_GROUP = 500_000  # NVMe optimizer sub-group: about 5 per rank here, so swapping overlaps the step
LABELS = {"fsdp": "PyTorch FSDP2", "zero3": "ds ZeRO stage 3", "zero3_cpu": "stage 3 + CPU offload",
          "zero3_nvme": "stage 3 + NVMe offload"}


def _offload(which, nvme):
    """The zero_optimization keys of each ds configuration (parameters and optimizer offloaded together)."""
    if which == "zero3_cpu":
        return {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
    if which == "zero3_nvme":
        return {"sub_group_size": SUB_GROUP, "offload_param": {"device": "nvme", "nvme_path": nvme},
                "offload_optimizer": {"device": "nvme", "nvme_path": nvme}}
    return {}


def _ds_step(base, micro, batches, which="zero3", nvme=None, overlap=True):
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": CLIP, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": LR}},
              "zero_optimization": {"stage": 3, "overlap_comm": overlap, **_offload(which, nvme)}}
    return engine_step(base, batches, config)


def _held_bytes(engine) -> int:
    """Host bytes this rank holds between steps for parameter shards, gradients, fp32 masters and
    optimizer state (swap staging buffers and in-memory shards included); activations excluded."""
    from ds_zero.memory import _nbytes

    opt, parts = engine.optimizer, engine.optimizer.parts
    held = [g.flat for g in parts.groups] + [s.param.data for g in parts.groups for s in g.sharded if s.persistent]
    held += list(engine.reducer.grads)
    if opt.swapped is not None:
        held += opt.swapped.buffers
    else:
        held += [] if opt.aliased else [t for m in opt.masters for t in (m, m.grad)]
    held += [v for st in opt.optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    if getattr(parts, "swap", None) is not None:
        held += [s._data for s in parts.swap.resident.values()]
    return _nbytes(held)


def _swap_bytes(engine) -> int:
    """Bytes this rank's NVMe swap files occupy (0 without NVMe offload)."""
    opt = engine.optimizer
    stores = [opt.swapped.store] if opt.swapped is not None else []
    if getattr(opt.parts, "swap", None) is not None:
        stores.append(opt.parts.swap.store)
    return sum(s.nbytes_on_disk() for s in stores)


def _fsdp_step(base, batches):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(base)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return torch_step(model, batches, LR, CLIP, set_to_none=True)


def _setup(dim, layers, micro):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, dist.get_rank()) for i in range(8)]
    return GPT(cfg), batches


def _time(steps, dim, layers, micro, rounds, nvme):
    base, batches = _setup(dim, layers, micro)
    runs = {"fsdp": _fsdp_step(base, batches)}
    runs.update({w: _ds_step(base, micro, batches, w, nvme) for w in ("zero3", "zero3_cpu", "zero3_nvme")})
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, steps))
    swap = _swap_bytes(runs["zero3_nvme"].engine)
    for name in ("zero3", "zero3_cpu", "zero3_nvme"):
        runs[name].engine.optimizer.close()
    return (sum(p.numel() for p in base.parameters()), {k: statistics.median(v) for k, v in times.items()},
            swap)


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory(which, dim, layers, micro, nvme):
    before = _rss_kib()
    base, batches = _setup(dim, layers, micro)
    model_bytes = sum(p.numel() * 4 for p in base.parameters())
    step = _fsdp_step(base, batches) if which == "fsdp" else _ds_step(base, micro, batches, which, nvme)
    del base
    for i in range(3):
        step(i)
    peak = (_rss_kib() - before) * 1024
    held = None
    if which != "fsdp":
        held = _held_bytes(step.engine)
        step.engine.optimizer.close()
    return peak, model_bytes, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--nvme-path", default=None, help="directory for the NVMe swap files (default: a "
                                                          "temporary directory)")
    args = parser.parse_args()
    nvme = tempfile.mkdtemp(prefix="bench_zero3_nvme_", dir=args.nvme_path)
    shape = (args.dim, args.layers, args.micro)
    try:
        params, t, swap = run_distributed(_time, 2, args=(args.steps, *shape, args.rounds, nvme), timeout=3600)[0]
        mem = {w: run_distributed(_memory, 2, args=(w, *shape, nvme), timeout=3600) for w in LABELS}
    finally:
        shutil.rmtree(nvme, ignore_errors=True)
    print(f"model: GPT {params / 1e6:.2f}M params, micro-batch {args.micro} × seq 128, 2 gloo ranks, 1 thread "
          f"each, median of {args.rounds} rounds × {args.steps} steps")
    for name, label in LABELS.items():
        peaks = ", ".join(f"{m / 2**20:.1f}" for m, _, _ in mem[name])
        held = "" if name == "fsdp" else f"   held: {mem[name][0][2] / 2**20:.1f} MiB"
        print(f"{label:<24} step: {t[name] * 1e3:8.1f} ms   peak RSS growth per rank: {peaks} MiB{held}")
    model_mib = mem["fsdp"][0][1] / 2**20
    print(f"(fp32 model alone: {model_mib:.1f} MiB; each rank also built the full model before sharding; "
          f"held: rank 0's shards, gradients, masters and optimizer state in host memory between steps; "
          f"NVMe swap files on rank 0: {swap / 2**20:.1f} MiB)")

    def peak(name):
        return max(m for m, _, _ in mem[name])

    print(f"ratio stage 3 / FSDP2 step time:  {t['zero3'] / t['fsdp']:.3f}")
    print(f"ratio stage 3 / FSDP2 peak memory: {peak('zero3') / peak('fsdp'):.3f}")
    for name in ("zero3_cpu", "zero3_nvme"):
        print(f"ratio {LABELS[name]} / stage 3 step time: {t[name] / t['zero3']:.3f}   "
              f"peak memory: {peak(name) / peak('zero3'):.3f}   held: {mem[name][0][2] / mem['zero3'][0][2]:.3f}")


if __name__ == "__main__":
    main()
