"""ZeRO stage 3 step time and peak memory vs PyTorch FSDP2 (``fully_shard``) and, when it is importable,
DeepSpeed's ZeRO-3 on the same GPT; and stage 3 with CPU offload and with NVMe offload (ZeRO-Infinity)
of parameters and optimizer state.

    python benchmarks/bench_zero3.py [--steps 10] [--rounds 3] [--dim 384] [--layers 6] [--nvme-path DIR]
                                     [--no-offload] [--no-memory]

Same GPT, same data, 2 gloo ranks with one thread each, in the same processes. Every loop does
forward, backward (gradients reduce-scattered), clipping at 1.0 and AdamW; the first 2 steps of each
timing are warm-up (gathers recorded, kernels compiled) and not timed. FSDP2 shards with one
``fully_shard`` call per transformer block plus one for the root (its recommended wrapping).

Both sides get the same choice of when to release gathered parameters, in two pairings:

- ``reshard``: parameters are released after each module's forward and gathered again for its backward
  — FSDP2's default (``reshard_after_forward=True``) against ds with ``stage3_max_reuse_distance: 0``
  and a prefetch bucket of one transformer block (FSDP2 prefetches the next block);
- ``keep``: parameters gathered in forward stay until backward has used them — FSDP2 with
  ``reshard_after_forward=False`` against ds's (and DeepSpeed's) default knobs (prefetch 5e7 elements,
  reuse distance 1e9, which keep every parameter backward uses again).

DeepSpeed gets the same ds config as ours in each pairing. Timings alternate (FSDP2, ds, DeepSpeed,
FSDP2, ...) round by round so machine noise hits all; each figure is the median of ``--rounds`` rounds
of ``--steps`` steps, and the spread (max/min over rounds) is printed to show how noisy the machine was.
Peak memory is each configuration's peak resident set size per rank (``ru_maxrss``) in a fresh pair
of processes running 3 steps, minus the RSS before the model is built — on a CPU machine the closest
measure of the memory a rank needed.

The offload rows are printed as ratios to plain stage 3 (``keep`` knobs). CPU offload keeps parameter
shards, fp32 masters and Adam state in host memory; NVMe offload keeps them in swap files under
``--nvme-path`` (default: a temporary directory on the disk holding ``/tmp``), stepping the optimizer
in sub-groups of ``SUB_GROUP`` elements so reads and writes overlap the step. The page cache is not
part of RSS.
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
from _deepspeed import deepspeed_step, rank_env, ratio_line, unavailable

from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

LR, CLIP = 1e-4, 1.0
SUB_GROUP = 500_000  # NVMe optimizer sub-group: about 5 per rank here, so swapping overlaps the step
LABELS = {"fsdpmod_reshard": "FSDP2 per module, reshard", "fsdpmod_keep": "FSDP2 per module, keep",
          "fsdp_reshard": "FSDP2, reshard", "zero3_reshard": "ds ZeRO-3, reshard",
          "deepspeed_reshard": "DeepSpeed ZeRO-3, reshard",
          "fsdp_keep": "FSDP2, keep", "zero3_keep": "ds ZeRO-3, keep", "deepspeed_keep": "DeepSpeed ZeRO-3, keep",
          "zero3_cpu": "ds ZeRO-3 + CPU offload", "zero3_nvme": "ds ZeRO-3 + NVMe offload"}
MEMORY = ("fsdp_keep", "zero3_keep", "zero3_cpu", "zero3_nvme")


def _block_numel(base) -> int:
    return sum(p.numel() for p in base.blocks[0].parameters())


def _zero(which, base, nvme):
    """The zero_optimization section of each ds (and DeepSpeed) configuration."""
    zero = {"stage": 3, "overlap_comm": True}
    if which.endswith("_reshard"):
        zero.update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=_block_numel(base))
    if which == "zero3_cpu":
        zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    if which == "zero3_nvme":
        zero.update(sub_group_size=SUB_GROUP, offload_param={"device": "nvme", "nvme_path": nvme},
                    offload_optimizer={"device": "nvme", "nvme_path": nvme})
    return zero


def _config(which, base, micro, nvme=None):
    return {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": CLIP, "steps_per_print": 0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR}}, "zero_optimization": _zero(which, base, nvme)}


def _step(which, base, micro, batches, nvme=None):
    if which.startswith("fsdp"):
        return _fsdp_step(base, batches, reshard=which.endswith("_reshard"), per_module=which.startswith("fsdpmod"))
    if which.startswith("deepspeed"):
        return deepspeed_step(base, batches, _config(which, base, micro))
    return engine_step(base, batches, _config(which, base, micro, nvme))


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


def _fsdp_step(base, batches, reshard: bool = True, per_module: bool = False):
    """FSDP2 per transformer block plus the root; ``per_module``: one ``fully_shard`` unit per module with
    parameters (the granularity of ZeRO-3's per-module gathers: what a ds stage 3 built on ``fully_shard``
    would wrap to keep that behaviour for any model)."""
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(base)
    units: list = list(model.blocks)
    if per_module:  # modules sharing a parameter (the tied head and embedding) form one unit
        units, owner = [], {}
        for m in model.modules():
            own = [id(p) for p in m.parameters(recurse=False)]
            if m is model or not own:
                continue
            shared = {owner[i] for i in own if i in owner}
            if shared:
                units[shared.pop()].append(m)
            else:
                owner.update({i: len(units) for i in own})
                units.append([m])
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return torch_step(model, batches, LR, CLIP, set_to_none=True)


def _setup(dim, layers, micro):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, dist.get_rank()) for i in range(8)]
    return GPT(cfg), batches


def _time(steps, dim, layers, micro, rounds, nvme, names):
    base, batches = _setup(dim, layers, micro)
    runs = {name: _step(name, base, micro, batches, nvme) for name in names}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, steps))
    swap = _swap_bytes(runs["zero3_nvme"].engine) if "zero3_nvme" in runs else 0
    for name, fn in runs.items():
        if name.startswith("zero3"):
            fn.engine.optimizer.close()
    return sum(p.numel() for p in base.parameters()), times, swap


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _memory(which, dim, layers, micro, nvme):
    before = _rss_kib()
    base, batches = _setup(dim, layers, micro)
    model_bytes = sum(p.numel() * 4 for p in base.parameters())
    step = _step(which, base, micro, batches, nvme)
    del base
    for i in range(3):
        step(i)
    peak = (_rss_kib() - before) * 1024
    held = None
    if which.startswith("zero3"):
        held = _held_bytes(step.engine)
        step.engine.optimizer.close()
    return peak, model_bytes, held


def _spread(values: list[float]) -> str:
    return f"spread {max(values) / min(values):.2f}×"


def _paired(rounds: dict, ours: str, theirs: str) -> str:
    """The ratio within each round (the two ran back to back, so they saw about the same machine load):
    its median and range show how far noise moves it."""
    ratios = sorted(a / b for a, b in zip(rounds[ours], rounds[theirs]))
    return (f"per round: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f} "
            f"over {len(ratios)} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--nvme-path", default=None, help="directory for the NVMe swap files (default: a "
                                                          "temporary directory)")
    parser.add_argument("--no-offload", action="store_true", help="skip the CPU and NVMe offload rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--fsdp-per-module", action="store_true", help="also time FSDP2 with one unit per "
                        "module (the back-end evaluation in docs/zero.md)")
    args = parser.parse_args()
    with_deepspeed = unavailable() is None
    names = ["fsdp_reshard", "zero3_reshard"] + (["deepspeed_reshard"] if with_deepspeed else [])
    names += ["fsdp_keep", "zero3_keep"] + (["deepspeed_keep"] if with_deepspeed else [])
    names += [] if args.no_offload else ["zero3_cpu", "zero3_nvme"]
    names += ["fsdpmod_reshard", "fsdpmod_keep"] if args.fsdp_per_module else []
    nvme = tempfile.mkdtemp(prefix="bench_zero3_nvme_", dir=args.nvme_path)
    shape = (args.dim, args.layers, args.micro)
    try:
        params, rounds, swap = run_distributed(_time, 2, args=(args.steps, *shape, args.rounds, nvme, names),
                                               timeout=7200, env=rank_env())[0]
        mem = {} if args.no_memory else {w: run_distributed(_memory, 2, args=(w, *shape, nvme), timeout=3600)
                                          for w in MEMORY if w in names}
    finally:
        shutil.rmtree(nvme, ignore_errors=True)
    t = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"model: GPT {params / 1e6:.2f}M params, micro-batch {args.micro} × seq 128, 2 gloo ranks, 1 thread "
          f"each, median of {args.rounds} rounds × {args.steps} steps (after 2 warm-up steps)")
    for name in names:
        line = f"{LABELS[name]:<26} step: {t[name] * 1e3:8.1f} ms  ({_spread(rounds[name])})"
        if name in mem:
            line += "   peak RSS growth per rank: " + ", ".join(f"{m / 2**20:.1f}" for m, _, _ in mem[name]) + " MiB"
            if mem[name][0][2] is not None:
                line += f"   held: {mem[name][0][2] / 2**20:.1f} MiB"
        print(line)
    if mem:
        print(f"(fp32 model alone: {mem['fsdp_keep'][0][1] / 2**20:.1f} MiB; each rank also built the full model "
              f"before sharding; held: rank 0's shards, gradients, masters and optimizer state in host memory "
              f"between steps" + (f"; NVMe swap files on rank 0: {swap / 2**20:.1f} MiB)" if swap else ")"))
    for pairing in ("reshard", "keep"):
        ours = f"zero3_{pairing}"
        print(f"ratio stage 3 / FSDP2, {pairing}:  {t[ours] / t[f'fsdp_{pairing}']:.3f}  (target <= 1.0)   "
              f"{_paired(rounds, ours, f'fsdp_{pairing}')}")
        line = ratio_line(f"stage 3 / DeepSpeed ZeRO-3, {pairing}", t[ours], t.get(f"deepspeed_{pairing}"))
        if f"deepspeed_{pairing}" in rounds:
            line += "   " + _paired(rounds, ours, f"deepspeed_{pairing}")
        print(line)
    for pairing in ("reshard", "keep"):
        if f"fsdpmod_{pairing}" in t:
            print(f"ratio stage 3 / FSDP2 per module, {pairing}: "
                  f"{t[f'zero3_{pairing}'] / t[f'fsdpmod_{pairing}']:.3f}")
    if "fsdp_keep" in mem:
        def peak(name):
            return max(m for m, _, _ in mem[name])

        print(f"ratio stage 3 / FSDP2 peak memory (keep): {peak('zero3_keep') / peak('fsdp_keep'):.3f}")
    for name in ("zero3_cpu", "zero3_nvme"):
        if name in t:
            line = f"ratio {LABELS[name]} / stage 3 step time: {t[name] / t['zero3_keep']:.3f}"
            if name in mem:
                line += (f"   peak memory: {max(m for m, _, _ in mem[name]) / max(m for m, _, _ in mem['zero3_keep']):.3f}"
                         f"   held: {mem[name][0][2] / mem['zero3_keep'][0][2]:.3f}")
            print(line)


if __name__ == "__main__":
    main()
