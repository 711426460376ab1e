"""1-bit Adam, 0/1 Adam and 1-bit LAMB vs their uncompressed baselines: step time and bytes on the wire.

    python benchmarks/bench_comm_efficient.py [--steps 20] [--rounds 3] [--dim 256] [--layers 4]
                                              [--section all|onebit|zeropp] [--world 2|4]

Same GPT, same data, 2 gloo ranks, same run. Each compressed optimizer warms up (1-bit Adam / LAMB:
``freeze_step`` 2 steps; 0/1 Adam: ``var_freeze_step`` 2, local steps every 4 after) and is then measured
against the engine with AdamW (or Lamb) on the same batches. Runs alternate so machine noise hits both;
medians are printed. Bytes per optimizer step are the comms logger's (all_reduce, all_to_all and
all_gather as recorded by ``ds_core.comm``) over the measured steps, and the ratio to the baseline's.
On two processes on one host gloo moves bytes through memory, so the time ratio says what the
compression costs in computation more than what it saves on a network.

The ``zeropp`` section (``--section zeropp``) runs ZeRO++ on stage 3 (every parameter partitioned:
``stage3_param_persistence_threshold`` 0; released after each use: ``stage3_max_reuse_distance`` 0, so
backward gathers again) against plain stage 3 the same way: qwZ
(``zero_quantized_weights``), qgZ (``zero_quantized_gradients``) and both, with the parameter
all-gather bytes and the gradient-reduction bytes (all_reduce / reduce_scatter / all_to_all) apart.
``--world 4`` adds hpZ (``zero_hpz_partition_size`` 2) and qgZ with hpZ (the hierarchical all-to-all)
on 4 ranks; the gather column then counts the backward gathers within the pairs too, and the gradient
column both levels of the hierarchical all-to-all.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from _common import engine_step, timed

from ds_core import comm
from ds_core.testing import run_distributed
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

METHODS = {
    "OneBitAdam": ("AdamW", {"freeze_step": 2}),
    "ZeroOneAdam": ("AdamW", {"var_freeze_step": 2, "local_step_scaler": 1, "local_step_clipper": 4}),
    "OneBitLamb": ("Lamb", {"freeze_step": 2}),
}


def _config(opt, micro, **params):
    return {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "steps_per_print": 0,
            "comms_logger": {"enabled": True},
            "optimizer": {"type": opt, "params": {"lr": 1e-4, **params}}}


def _measure(step_fn, steps):
    comm.comms_logger.reset()
    seconds = timed(step_fn, steps, warmup=0)
    wire = sum(t["bytes"] for t in comm.comms_logger.totals().values()) / steps
    return seconds, wire


def _setup(dim: int, layers: int, micro: int):
    """The seeded GPT both sections time, its config and this rank's 8 batches."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=128, dim=dim, layers=layers, heads=4)
    batches = [synthetic_tokens(micro, cfg.seq_len, cfg.vocab_size, i, dist.get_rank()) for i in range(8)]
    return cfg, batches, GPT(cfg)


def _bench(steps: int, dim: int, layers: int, micro: int, rounds: int):
    cfg, batches, base = _setup(dim, layers, micro)
    runs = {}
    for name, (baseline, params) in METHODS.items():
        if baseline not in runs:
            runs[baseline] = engine_step(base, batches, _config(baseline, micro))
        runs[name] = engine_step(base, batches, _config(name, micro, **params))
    for fn in runs.values():  # past warm-up (and the first local window) before anything is measured
        for i in range(6):
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in runs}
    wire: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            seconds, nbytes = _measure(fn, steps)
            times[name].append(seconds)
            wire[name].append(nbytes)
    params = sum(p.numel() for p in base.parameters())
    return params, {k: (statistics.median(times[k]), statistics.median(wire[k])) for k in runs}


ZEROPP = {
    "qwZ": {"zero_quantized_weights": True},
    "qgZ": {"zero_quantized_gradients": True},
    "qwZ+qgZ": {"zero_quantized_weights": True, "zero_quantized_gradients": True},
}
GRAD_OPS = ("all_reduce", "reduce_scatter", "all_to_all")


HPZ = {
    "hpZ": {"zero_hpz_partition_size": 2},
    "qgZ+hpZ": {"zero_quantized_gradients": True, "zero_hpz_partition_size": 2},
}


def _bench_zeropp(steps: int, dim: int, layers: int, micro: int, rounds: int):
    cfg, batches, base = _setup(dim, layers, micro)

    def config(**zeropp):
        # reuse distance 0: released after each use, so backward gathers again (as a model too large to
        # keep its forward's parameters does); hpZ moves those gathers into the pairs
        return dict(_config("AdamW", micro), zero_optimization={
            "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, **zeropp})

    runs = {"stage 3": engine_step(base, batches, config())}
    methods = dict(ZEROPP, **(HPZ if dist.get_world_size() >= 4 else {}))
    runs.update({name: engine_step(base, batches, config(**keys)) for name, keys in methods.items()})
    for fn in runs.values():  # the first steps record the gather order
        for i in range(3):
            fn(i)
    out: dict[str, list] = {k: [] for k in runs}
    world = dist.get_world_size()
    in_group: dict[str, int] = {}  # all-gather bytes on groups smaller than the world (hpZ's)
    add = comm.comms_logger.add

    def record(op, nbytes, seconds, size):
        if op == "all_gather" and size < world:
            in_group["bytes"] = in_group.get("bytes", 0) + nbytes
        add(op, nbytes, seconds, size)

    comm.comms_logger.add = record
    for _ in range(rounds):
        for name, fn in runs.items():
            comm.comms_logger.reset()
            in_group.clear()
            seconds = timed(fn, steps, warmup=0)
            totals = comm.comms_logger.totals()
            small = in_group.get("bytes", 0) / steps
            gather = totals.get("all_gather", {}).get("bytes", 0) / steps - small
            grads = sum(totals.get(op, {}).get("bytes", 0) for op in GRAD_OPS) / steps
            out[name].append((seconds, gather, small, grads))
    comm.comms_logger.add = add
    params = sum(p.numel() for p in base.parameters())
    return params, {k: tuple(statistics.median(v[i] for v in out[k]) for i in range(4)) for k in runs}


def _print_zeropp(args) -> None:
    results = run_distributed(_bench_zeropp, args.world,
                              args=(args.steps, args.dim, args.layers, args.micro, args.rounds), timeout=3600)
    params, r = results[0]
    print(f"ZeRO++ vs plain stage 3: GPT {params / 1e6:.2f} M parameters, {args.world} gloo ranks, micro-batch "
          f"{args.micro}, median of {args.rounds} rounds x {args.steps} steps")
    print("gather B/step: parameter all-gathers over all ranks; in-pair: hpZ's gathers within 2-rank groups")
    print(f"{'method':<10}{'ms/step':>10}{'time ratio':>12}{'gather B/step':>15}{'ratio':>8}{'in-pair B/step':>16}"
          f"{'grad B/step':>14}{'ratio':>8}")
    t0, g0, _, r0 = r["stage 3"]
    for name, (t, g, small, gr) in r.items():
        print(f"{name:<10}{t * 1e3:>10.1f}{t / t0:>12.3f}{g:>15,.0f}{g / g0:>8.3f}{small:>16,.0f}"
              f"{gr:>14,.0f}{gr / r0:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="a multiple of 4 keeps 0/1 Adam's windows whole")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--section", choices=("all", "onebit", "zeropp"), default="all")
    parser.add_argument("--world", type=int, default=2, help="ranks of the zeropp section (4 adds hpZ)")
    args = parser.parse_args()
    if args.section in ("all", "zeropp"):
        _print_zeropp(args)
    if args.section == "zeropp":
        return
    results = run_distributed(_bench, 2, args=(args.steps, args.dim, args.layers, args.micro, args.rounds),
                              timeout=3600)
    params, r = results[0]
    print(f"GPT {params / 1e6:.2f} M parameters (fp32 gradients {4 * params / 1e6:.2f} MB), 2 gloo ranks, "
          f"micro-batch {args.micro}, median of {args.rounds} rounds x {args.steps} steps after warm-up")
    print(f"{'method':<14}{'baseline':<10}{'ms/step':>10}{'base ms':>10}{'time ratio':>12}"
          f"{'bytes/step':>14}{'base bytes':>14}{'bytes ratio':>13}")
    for name, (baseline, _) in METHODS.items():
        (t, b), (tb, bb) = r[name], r[baseline]
        print(f"{name:<14}{baseline:<10}{t * 1e3:>10.1f}{tb * 1e3:>10.1f}{t / tb:>12.3f}"
              f"{b:>14,.0f}{bb:>14,.0f}{b / bb:>13.4f} (1/{bb / b:.1f})")


if __name__ == "__main__":
    main()
