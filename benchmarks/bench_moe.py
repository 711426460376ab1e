"""MoE layer throughput vs a naive per-token loop and a dense FFN; all-to-all vs compute with ep_size 2.

    python benchmarks/bench_moe.py [--tokens 2048] [--dim 256] [--experts 8] [--k 2] [--rounds 3]

Part 1 (one process, one thread): forward + backward tokens/s of
- ``ds_moe.MoE`` (tokens sorted by expert, one call per expert on its slice),
- a naive MoE with the same gate and experts that runs every (token, expert) pair separately,
- a dense FFN with the active parameters of one token (hidden ``k ×`` the expert's),
interleaved round by round so machine noise hits all three; medians are printed with the ratios.

Part 2 (2 gloo ranks, ``ds_core.testing.run_distributed``): the same layer with ``ep_size=2``; the time
spent inside the all-to-alls (counts, dispatch, combine, and their backward) is measured around each
collective and compared with the rest of the forward + backward. When DeepSpeed is importable, its
``deepspeed.moe.layer.MoE`` (same gate settings and expert, ``ep_size=2``) runs alternating with ours on
the same tokens and the ratio of forward + backward times is printed (``_deepspeed.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import types

import torch
import torch.distributed as dist
from _deepspeed import import_deepspeed, rank_env, ratio_line, unavailable

from ds_core.testing import run_distributed
from ds_core.testing.models import MLP


def _layer(dim: int, experts: int, k: int, ep: int = 1):
    from ds_moe import MoE

    torch.manual_seed(0)
    return MoE(dim, MLP(dim, 4 * dim), num_experts=experts, ep_size=ep, k=k, capacity_factor=1.25,
               use_rts=False)


def _naive(moe, x):
    """Same routing, then one expert call per (token, expert) pair: the loop ds-moe avoids."""
    r = moe.gate(x)
    out = torch.zeros_like(x)
    rows = []
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight):
        rows.append((t, w * moe.experts.experts[str(e)](x[t:t + 1])[0]))
    for t, row in rows:
        out[t] = out[t] + row
    return out, r.l_aux


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def local(tokens: int, dim: int, experts: int, k: int, rounds: int):
    torch.set_num_threads(1)
    moe = _layer(dim, experts, k)
    dense = MLP(dim, 4 * dim * k)
    torch.manual_seed(1)
    x = torch.randn(tokens, dim)

    def run_moe():
        out, l_aux, _ = moe(x)
        (out.sum() + l_aux).backward()

    def run_naive():
        out, l_aux = _naive(moe, x)
        (out.sum() + l_aux).backward()

    def run_dense():
        dense(x).sum().backward()

    times = {"moe": [], "naive": [], "dense": []}
    for _ in range(rounds):
        times["moe"].append(_time(run_moe, 3))
        times["naive"].append(_time(run_naive, 1))
        times["dense"].append(_time(run_dense, 3))
    return {name: statistics.median(t) for name, t in times.items()}, moe.last_routing.dropped


def _instrument(spent: list[float]):
    """Time every collective ds_moe's all-to-all module issues (forward and backward)."""
    import ds_moe.exchange as a2a
    from ds_core import comm

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = comm.all_to_all(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return result

    a2a.comm = types.SimpleNamespace(all_to_all=timed)


def _deepspeed_layer(dim: int, experts: int, k: int, ep: int):
    import_deepspeed()
    from deepspeed.moe.layer import MoE

    torch.manual_seed(0)
    layer = MoE(hidden_size=dim, expert=MLP(dim, 4 * dim), num_experts=experts, ep_size=ep, k=k,
                capacity_factor=1.25, use_rts=False)
    with contextlib.redirect_stdout(io.StringIO()):
        layer.set_deepspeed_parallelism()  # DeepSpeed's engine does this; here the layer runs alone
    return layer


def expert_parallel(tokens: int, dim: int, experts: int, k: int, rounds: int, with_deepspeed: bool = False):
    spent: list[float] = []
    _instrument(spent)
    moe = _layer(dim, experts, k, ep=2)
    torch.manual_seed(2 + dist.get_rank())
    x = torch.randn(tokens, dim)

    def step():
        out, l_aux, _ = moe(x)
        (out.sum() + l_aux).backward()

    theirs = None
    if with_deepspeed:
        deep = _deepspeed_layer(dim, experts, k, ep=2)

        def theirs():
            out, l_aux, _ = deep(x.unsqueeze(0))
            (out.sum() + l_aux).backward()

        theirs()
    totals, comms, deep_totals = [], [], []
    for _ in range(rounds):
        step()
        dist.barrier()
        spent.clear()
        start = time.perf_counter()
        for _ in range(3):
            step()
        totals.append((time.perf_counter() - start) / 3)
        comms.append(sum(spent) / 3)
        calls = len(spent) // 3
        if theirs is not None:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(3):
                theirs()
            deep_totals.append((time.perf_counter() - start) / 3)
    deep_t = statistics.median(deep_totals) if deep_totals else None
    return statistics.median(totals), statistics.median(comms), calls, deep_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shape = (args.tokens, args.dim, args.experts, args.k, args.rounds)

    t, dropped = local(*shape)
    tps = {name: args.tokens / s for name, s in t.items()}
    print(f"MoE layer: {args.tokens} tokens × dim {args.dim}, {args.experts} experts (hidden {4 * args.dim}), "
          f"top-{args.k}, capacity factor 1.25 ({dropped} assignments dropped); forward + backward, 1 thread")
    print(f"  ds_moe.MoE (sorted, one call per expert): {tps['moe']:12,.0f} tokens/s")
    print(f"  naive per-(token, expert) loop:           {tps['naive']:12,.0f} tokens/s   "
          f"ds_moe / naive = {tps['moe'] / tps['naive']:.1f}×")
    print(f"  dense FFN, equal active params:           {tps['dense']:12,.0f} tokens/s   "
          f"ds_moe / dense = {tps['moe'] / tps['dense']:.2f}")

    with_deepspeed = unavailable() is None
    results = run_distributed(expert_parallel, 2, args=(*shape, with_deepspeed), timeout=1800, env=rank_env())
    total, comm_t, calls, deep_t = max(results, key=lambda r: r[0])
    if with_deepspeed:
        deep_t = max(r[3] for r in results)
    print(f"ep_size 2 on 2 gloo ranks ({args.tokens} tokens per rank, {args.experts // 2} experts per rank), "
          f"slowest rank:")
    print(f"  forward + backward {total * 1e3:8.1f} ms: all-to-all {comm_t * 1e3:.1f} ms "
          f"({100 * comm_t / total:.0f}%, {calls} collectives), compute and routing "
          f"{(total - comm_t) * 1e3:.1f} ms ({100 * (total - comm_t) / total:.0f}%)")
    if deep_t is not None:
        print(f"  DeepSpeed MoE (ep_size 2, same tokens): forward + backward {deep_t * 1e3:8.1f} ms")
    print("  " + ratio_line("ds_moe / DeepSpeed MoE time", total, deep_t))


if __name__ == "__main__":
    main()
