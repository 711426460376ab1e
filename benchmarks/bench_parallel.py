"""Tensor and sequence parallelism: step time and memory against the baselines, in the same run.

    python benchmarks/bench_parallel.py [--rounds 3] [--steps 4] [--lengths 1024,2048,4096]

Part 1 — tensor parallel 2 on 2 gloo ranks (one thread each), a Llama-style model (hidden 512, 8 heads,
4 KV heads, MLP 1408, 4 layers, vocabulary 8000), batch 4 × 256 tokens, AdamW, fp32:
- the unsharded model on one process (rank 0 alone; rank 1 waits),
- ds-parallel through ``ds_core.initialize`` with ``tensor_parallel: {"autotp_size": 2}``,
- PyTorch's ``torch.distributed.tensor.parallel.parallelize_module`` with the same plan (Q/K/V, gate and
  up column-wise, O and down row-wise; embedding and head replicated in both) and ``torch.optim.AdamW``,
interleaved round by round; the medians and ratios are printed, and the first losses compared.

Part 2 — Ulysses sequence parallel 2 vs 1 at growing lengths (a smaller Llama, batch 1): step time
(medians) and peak bytes held by the step per rank (``ds_parallel.PeakMemory``, measured in a separate
pass: it slows the step). With DeepSpeed importable, its ``DistributedAttention`` runs on the same
inputs as ours (max difference and time ratio).

Part 3 — on CUDA (only when a GPU is visible): tiled MLP and tiled loss peak memory and time at growing
lengths on one GPU (hidden 1024, MLP 4096, vocabulary 32000) against the untiled layers.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_core.testing import run_distributed


def _llama(hidden=512, heads=8, kv=4, inner=1408, layers=4, vocab=8000, seq=4096, seed=0):
    import transformers as t

    cfg = t.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return t.AutoModelForCausalLM.from_config(cfg).float()


def _batches(n, batch, seq, vocab=8000):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def _time(step, steps):
    step(-1)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - start) / steps


def _optimizer(groups):
    return torch.optim.AdamW(groups, lr=1e-4)


# -- part 1: tensor parallel -------------------------------------------------------------------------

def _torch_tp(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    for i in range(len(model.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)
    for layer in model.model.layers:  # torchtitan's adjustment: local head counts
        layer.self_attn.num_key_value_groups = layer.self_attn.config.num_attention_heads // \
            layer.self_attn.config.num_key_value_heads
    return model


def _part1(rounds, steps, batch, seq):
    from torch.distributed.device_mesh import init_device_mesh

    import ds_core

    rank = dist.get_rank()
    data = _batches(steps + 1, batch, seq)
    base = _llama()

    # unsharded, one process
    plain = copy.deepcopy(base)
    plain_opt = _optimizer(plain.parameters())

    def plain_step(i):
        if rank == 0:
            plain(input_ids=data[i], labels=data[i]).loss.backward()
            plain_opt.step()
            plain_opt.zero_grad()

    # ds-parallel through initialize
    engine, *_ = ds_core.initialize(model=copy.deepcopy(base), optimizer=_optimizer, config={
        "train_micro_batch_size_per_gpu": batch, "steps_per_print": 0,
        "tensor_parallel": {"autotp_size": 2, "shard_embeddings": False}})

    def ours_step(i):
        loss = engine(input_ids=data[i], labels=data[i]).loss
        engine.backward(loss)
        engine.step()
        return loss

    # PyTorch DTensor tensor parallelism, the same plan
    mesh = init_device_mesh("cpu", (2,))
    theirs = _torch_tp(copy.deepcopy(base), mesh)
    their_opt = _optimizer(theirs.parameters())

    def theirs_step(i):
        loss = theirs(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        their_opt.step()
        their_opt.zero_grad()
        return loss

    first = (ours_step(0).item(), theirs_step(0).item(), base(input_ids=data[0], labels=data[0]).loss.item())
    times = {"unsharded": [], "ds_parallel": [], "parallelize_module": []}
    for _ in range(rounds):
        for name, fn in (("unsharded", plain_step), ("ds_parallel", ours_step), ("parallelize_module", theirs_step)):
            dist.barrier()
            times[name].append(_time(fn, steps))
            dist.barrier()
    return {k: statistics.median(v) for k, v in times.items()}, first


# -- part 2: sequence parallel -----------------------------------------------------------------------

def _sp_model():
    return _llama(hidden=256, heads=8, kv=4, inner=704, layers=2, vocab=8000)


def _sp_step(model, opt, batch_fn):
    def step(i):
        out = model(**batch_fn())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def _part2(rounds, steps, lengths):
    from ds_parallel import PeakMemory, sequence_parallel, shard_batch

    rank = dist.get_rank()
    sp_model = sequence_parallel(_sp_model(), sp_size=2)
    sp_opt = _optimizer(sp_model.parameters())
    one = _sp_model()
    one_opt = _optimizer(one.parameters())
    rows = []
    for length in lengths:
        ids = torch.randint(0, 8000, (1, length), generator=torch.Generator().manual_seed(length))
        full = {"input_ids": ids, "labels": ids}
        sp_step = _sp_step(sp_model, sp_opt, lambda full=full: shard_batch(full, sp_model.ds_sp_group))
        one_step = _sp_step(one, one_opt, lambda full=full: full)
        t1, t2 = [], []
        for _ in range(rounds):
            dist.barrier()
            if rank == 0:
                t1.append(_time(one_step, steps))
            dist.barrier()
            t2.append(_time(sp_step, steps))
        with PeakMemory() as m2:
            sp_step(0)
        m1 = None
        if rank == 0:
            with PeakMemory() as pm:
                one_step(0)
            m1 = pm.peak
        dist.barrier()
        rows.append((length, statistics.median(t1) if t1 else None, statistics.median(t2), m1, m2.peak))
    return rows


def _deepspeed_attention(rounds, steps, length):
    """Ours vs DeepSpeed's DistributedAttention on the same inputs, when DeepSpeed is importable."""
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention as DeepSpeedAttention
    except Exception as exc:  # noqa: BLE001 - any import failure means: no baseline
        return f"DeepSpeed not importable ({type(exc).__name__}: {exc}); skipped"
    from ds_parallel import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def local(q, k, v):  # [s, b, h, d]
        return F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                              is_causal=True).permute(2, 0, 1, 3)

    g = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(length // 2, 1, 16, 64, generator=g, requires_grad=True) for _ in range(3))
    ours, theirs = DistributedAttention(local, dist.group.WORLD), DeepSpeedAttention(local, dist.group.WORLD)
    diff = (ours(q, k, v, 1) - theirs(q, k, v, 1)).abs().max().item()

    def run(layer):
        def step(i):
            layer(q, k, v, 1).sum().backward()
        return step

    def timed(step):  # wall clock and this process's CPU time (steadier when other jobs share the cores)
        step(-1)
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(steps):
            step(i)
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    t_ours, t_theirs = [], []
    for r in range(rounds):  # alternate which runs first: the first of a pair pays for cold caches
        order = [(run(ours), t_ours), (run(theirs), t_theirs)]
        for step, times in order if r % 2 == 0 else order[::-1]:
            dist.barrier()
            times.append(timed(step))
    out = [diff]
    for k in (0, 1):  # wall, CPU
        ratios = [a[k] / b[k] for a, b in zip(t_ours, t_theirs)]
        out.append((statistics.median(a[k] for a in t_ours), statistics.median(b[k] for b in t_theirs),
                    statistics.median(ratios), min(ratios), max(ratios)))
    return tuple(out)


def _distributed(rounds, steps, lengths, batch, seq, sections):
    torch.set_num_threads(1)
    out = {}
    if "tp" in sections:
        out["tp"] = _part1(rounds, steps, batch, seq)
    if "sp" in sections:
        out["sp"] = _part2(rounds, max(1, steps // 2), lengths)
    out["deepspeed"] = (_deepspeed_attention(rounds, steps, max(lengths)) if "deepspeed" in sections
                        else "not asked (--no-deepspeed or --sections)")
    return out


# -- part 3: CUDA --------------------------------------------------------------------------------------

def _cuda_tiling(lengths):
    from ds_parallel import tile_mlp, tiled_lm_loss

    dev = torch.device("cuda")
    hidden, inner, vocab = 1024, 4096, 32000
    mlp = torch.nn.Sequential(torch.nn.Linear(hidden, inner), torch.nn.GELU(), torch.nn.Linear(inner, hidden)).to(dev)
    tiled = tile_mlp(copy.deepcopy(mlp), tile_size=1024)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dev)
    print(f"\nCUDA ({torch.cuda.get_device_name()}): peak bytes and time of forward + backward, hidden {hidden}, "
          f"MLP {inner}, vocabulary {vocab}, tiles of 1024")
    print(f"{'sequence':>9} {'MLP GB':>8} {'tiled':>8} {'loss GB':>8} {'tiled':>8} {'MLP ms':>8} {'tiled':>8} "
          f"{'loss ms':>8} {'tiled':>8}")
    for length in lengths:
        x = torch.randn(1, length, hidden, device=dev, requires_grad=True)
        labels = torch.randint(0, vocab, (1, length), device=dev)
        runs = {
            "mlp": lambda x=x: mlp(x).sum().backward(),
            "tmlp": lambda x=x: tiled(x).sum().backward(),
            "loss": lambda x=x, labels=labels: F.cross_entropy(head(x).view(-1, vocab), labels.view(-1)).backward(),
            "tloss": lambda x=x, labels=labels: tiled_lm_loss(x, head, labels, tile_size=1024)[0].backward(),
        }
        peak, ms = {}, {}
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ms[name] = (time.perf_counter() - start) * 1e3
            peak[name] = (torch.cuda.max_memory_allocated() - base) / 1e9
        print(f"{length:>9} {peak['mlp']:>8.2f} {peak['tmlp']:>8.2f} {peak['loss']:>8.2f} {peak['tloss']:>8.2f} "
              f"{ms['mlp']:>8.1f} {ms['tmlp']:>8.1f} {ms['loss']:>8.1f} {ms['tloss']:>8.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed DistributedAttention baseline")
    parser.add_argument("--sections", default="tp,sp,deepspeed",
                        help="comma-separated subset of tp,sp,deepspeed (the CUDA part runs when a GPU is visible)")
    args = parser.parse_args(argv)
    lengths = [int(v) for v in args.lengths.split(",")]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"tp", "sp", "deepspeed"}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from tp, sp, deepspeed")
    if args.no_deepspeed:
        sections.discard("deepspeed")
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    results = run_distributed(_distributed, 2, args=(args.rounds, args.steps, lengths, args.batch, args.seq,
                                                          sections),
                              timeout=7200, env=env)
    if "tp" in results[0]:
        _print_tp(results, args)
    if "sp" in results[0]:
        _print_sp(results)
    _print_deepspeed(results, lengths)
    if torch.cuda.is_available():
        _cuda_tiling([4096, 16384, 65536])
    else:
        print("\nCUDA section: no GPU visible (torch.cuda.is_available() is False); skipped")
    return 0


def _print_tp(results, args):
    (times, first) = results[0]["tp"]
    print(f"tensor parallel 2 on 2 gloo ranks, Llama hidden 512 × 4 layers (8 heads, 4 KV heads), batch "
          f"{args.batch} × {args.seq}, AdamW fp32; median of {args.rounds} rounds × {args.steps} steps:")
    for name, value in times.items():
        print(f"  {name:<20} {value * 1e3:8.1f} ms/step")
    print(f"  ds_parallel / unsharded          = {times['ds_parallel'] / times['unsharded']:.2f}")
    print(f"  ds_parallel / parallelize_module = {times['ds_parallel'] / times['parallelize_module']:.2f}")
    print(f"  first-step loss: ds_parallel {first[0]:.6f}, parallelize_module {first[1]:.6f}, unsharded {first[2]:.6f}")


def _print_sp(results):
    print("\nUlysses sequence parallel, Llama hidden 256 × 2 layers (8 heads, 4 KV heads), batch 1, AdamW fp32:")
    print(f"{'sequence':>9} {'SP1 ms':>9} {'SP2 ms':>9} {'ratio':>6} {'SP1 peak MB':>12} {'SP2 peak MB':>12} {'ratio':>6}")
    for (length, t1, t2, m1, m2), other in zip(results[0]["sp"], results[1]["sp"]):
        t2 = max(t2, other[2])
        m2 = max(m2, other[4])
        print(f"{length:>9} {t1 * 1e3:>9.1f} {t2 * 1e3:>9.1f} {t2 / t1:>6.2f} {m1 / 1e6:>12.1f} {m2 / 1e6:>12.1f} "
              f"{m2 / m1:>6.2f}")


def _print_deepspeed(results, lengths):
    ds = results[0]["deepspeed"]
    if isinstance(ds, str):
        print(f"\nDistributedAttention vs DeepSpeed: {ds}")
        return
    diff, *clocks = ds
    print(f"\nDistributedAttention (sequence {max(lengths)}, 16 heads of 64, causal SDPA) vs DeepSpeed's on the "
          f"same inputs: max |difference| {diff:.1e}; forward + backward per step, rank 0, medians:")
    for name, (ours, theirs, ratio, low, high) in zip(("wall", "CPU time"), clocks):
        print(f"  {name:<9} ours {ours * 1e3:8.1f} ms, DeepSpeed {theirs * 1e3:8.1f} ms; ours / DeepSpeed per "
              f"round: median {ratio:.2f}, range {low:.2f}-{high:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
