"""Serving throughput and latency: ds-infer's engine vs Hugging Face ``generate``, same requests, same run.

A small random Llama (4 layers, hidden 256, GQA 8/4 heads, a byte-level BPE vocabulary trained here; no
downloads) serves one offline batch of requests with mixed prompt lengths (8-128 tokens) and output
lengths (8-64 tokens, EOS ignored so every system produces exactly the same number of tokens), all
arriving at t = 0. Three systems:

- ``ds``: ``ds_infer.LLM`` — continuous batching over the paged KV cache, split prefill;
- ``hf-seq``: Hugging Face ``generate`` request by request (what a naive server does);
- ``hf-staticB``: ``generate`` on static left-padded batches of B requests in arrival order, each
  batch decoding until its longest request is done (B = 8, and 32: the whole run in one batch);
- ``ds-http``: the same engine behind ``ds serve``'s HTTP server, every request streamed at once over
  loopback (what a client sees; skip with ``--no-http``).

Rounds alternate the systems (ds, hf-seq, ds-http, the static batches, then the next round) so machine noise hits
all of them; figures are medians over rounds, speedups medians of per-round ratios. Throughput is
generated tokens per second of wall time, and per second of this process's CPU time (steadier on a
shared machine); TTFT is from t = 0 to a request's first token; inter-token latency is the gap between
consecutive tokens of a request (p50/p95 over all gaps). Targets on CPU: >= 4x hf-seq and >= 1.5x
hf-static throughput.

    python benchmarks/bench_serve.py [--requests 32] [--rounds 3] [--threads 1] [--batch 8,32] [--quick]

Prefix caching: 24 requests sharing a 192-token system prompt with short distinct questions, ds with
prefix caching on vs off: hit rate and the speedup of the batch.

On a machine with CUDA the same comparison runs on the GPU (bf16, a larger 8-layer hidden-1024 model),
and against vLLM when it imports; :func:`cuda_section` returns those figures for GPU scripts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("the cat dog sat on a mat and ran to house tree big small red blue green quick brown fox jumps over "
         "lazy river under bridge light dark day night sun moon star sky water fire earth wind stone road "
         "city village market bread apple mountain forest cloud rain snow field garden window door table chair "
         "book paper letter story song music voice dream heart mind hand eye face friend family child king "
         "queen castle ship sea island bird fish horse wolf bear lion tiger").split()


# --- the model and the workload --------------------------------------------------------------------


def build_model_dir(path: Path, vocab: int = 2048, hidden: int = 256, layers: int = 4, heads: int = 8,
                    kv_heads: int = 4):  # fmt: skip
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.padding_side = "left"
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return fast


def workload(tok, n: int, seed: int = 1, prompt_range=(8, 128), output_range=(8, 64)):
    """``n`` (prompt token ids, output length) pairs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        want = rng.randint(*prompt_range)
        ids = []
        while len(ids) < want:
            ids += tok(" " + rng.choice(WORDS))["input_ids"]
        out.append((ids[:want], rng.randint(*output_range)))
    return out


# --- the systems -----------------------------------------------------------------------------------


class Timeline:
    """Token timestamps per request, relative to the start of the batch, and the CPU time spent."""

    def __init__(self, n: int) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.times: list[list[float]] = [[] for _ in range(n)]

    def mark(self, i: int, count: int = 1) -> None:
        t = time.perf_counter() - self.t0
        self.times[i].extend([t] * count)

    def summary(self, total_tokens: int) -> dict:
        cpu = time.process_time() - self.cpu0
        wall = max(t[-1] for t in self.times if t)
        ttft = [t[0] for t in self.times if t]
        itl = [b - a for t in self.times for a, b in zip(t, t[1:])]
        return {"tok_s": total_tokens / wall, "tok_cpu_s": total_tokens / cpu, "wall": wall, "ttft": ttft,
                "itl": itl}


def run_ds(llm, work) -> dict:
    from ds_infer import SamplingParams

    engine = llm.engine
    engine.reset_prefix_cache()  # no head start from an earlier round's identical prompts
    line = Timeline(len(work))
    ids = {}
    for i, (prompt, n) in enumerate(work):
        rid = engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        ids[rid] = i
    while engine.has_unfinished():
        for update in engine.step():
            if update.new_token_ids:
                line.mark(ids[update.request_id], len(update.new_token_ids))
    for rid in ids:
        engine.release(rid)
    return line.summary(sum(n for _, n in work))


def _hf_generate(model, input_ids, attention_mask, n: int, streamer=None):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=model.config.pad_token_id, streamer=streamer)


class _Streamer:
    """HF streamer that timestamps each decoding step (the first put() is the prompt)."""

    def __init__(self, line: Timeline, rows: list[int], lengths: list[int]) -> None:
        self.line, self.rows, self.lengths, self.step = line, rows, lengths, -1

    def put(self, value) -> None:
        self.step += 1
        if self.step == 0:
            return
        for row, length in zip(self.rows, self.lengths):
            if self.step <= length:  # padding steps of a finished row produce nothing useful
                self.line.mark(row)

    def end(self) -> None:
        pass


def run_http(server, work) -> dict:
    """The same requests through the OpenAI-compatible server, all at once, streamed (SSE)."""
    import asyncio

    import httpx

    server.engine.engine.reset_prefix_cache()  # the server is idle between rounds
    url = server.url
    line = Timeline(len(work))

    async def one(client, i, prompt, n):
        body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for chunk in r.aiter_lines():
                if chunk.startswith("data: {"):
                    line.mark(i)

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            await asyncio.gather(*[one(client, i, p, n) for i, (p, n) in enumerate(work)])

    asyncio.run(run())
    # a chunk carries one token's text (rarely none: half a character is held back); count tokens exactly
    return line.summary(sum(n for _, n in work))


@torch.inference_mode()
def run_hf_seq(model, work, device) -> dict:
    line = Timeline(len(work))
    for i, (prompt, n) in enumerate(work):
        ids = torch.tensor([prompt], device=device)
        _hf_generate(model, ids, torch.ones_like(ids), n, _Streamer(line, [i], [n]))
    return line.summary(sum(n for _, n in work))


@torch.inference_mode()
def run_hf_static(model, work, batch: int, pad_id: int, device) -> dict:
    line = Timeline(len(work))
    for start in range(0, len(work), batch):
        chunk = work[start:start + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        lengths = [n for _, n in chunk]
        _hf_generate(model, ids.to(device), mask.to(device), max(lengths),
                     _Streamer(line, list(range(start, start + len(chunk))), lengths))
    return line.summary(sum(n for _, n in work))


# --- reporting -------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(title: str, results: dict[str, list[dict]], base: str = "ds") -> None:
    """Medians over rounds; the speedups are medians of per-round ratios (paired, so slow phases of a
    shared machine cancel), by wall time and by CPU time."""
    print(f"\n{title}")
    print(f"  {'system':<13}{'tok/s':>8}{'tok/CPU-s':>11}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>9}{'ITL p95':>9}"
          f"{'ds speedup (wall, CPU)':>25}")
    for name, runs in results.items():
        def m(key, q, runs=runs):
            return statistics.median(pct(r[key], q) for r in runs)

        wall = statistics.median(r["tok_s"] for r in runs)
        cpu = statistics.median(r["tok_cpu_s"] for r in runs)
        pairs = list(zip(results[base], runs))
        r_wall = statistics.median(b["tok_s"] / o["tok_s"] for b, o in pairs)
        r_cpu = statistics.median(b["tok_cpu_s"] / o["tok_cpu_s"] for b, o in pairs)
        speed = "" if name == base else f"{r_wall:.2f}x, {r_cpu:.2f}x"
        ttft = f"{m('ttft', .5) * 1e3:>8.0f}ms{m('ttft', .95) * 1e3:>8.0f}ms" if runs[0]["ttft"] else " " * 20
        itl = f"{m('itl', .5) * 1e3:>7.1f}ms{m('itl', .95) * 1e3:>7.1f}ms" if runs[0]["itl"] else " " * 18
        print(f"  {name:<13}{wall:>8.1f}{cpu:>11.1f}{ttft}{itl}{speed:>25}")


def compare(llm, hf, tok, work, rounds: int, batches: list[int], device, server=None) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"ds": [], "hf-seq": []}
    if server is not None:
        results["ds-http"] = []
    for batch in batches:
        results[f"hf-static{batch}"] = []
    for r in range(rounds):
        results["ds"].append(run_ds(llm, work))
        results["hf-seq"].append(run_hf_seq(hf, work, device))
        if server is not None:
            results["ds-http"].append(run_http(server, work))
        for batch in batches:
            results[f"hf-static{batch}"].append(run_hf_static(hf, work, batch, tok.pad_token_id, device))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]['tok_s']:.0f} tok/s" for k, v in results.items()),
              flush=True)
    return results


def prefix_section(model_dir, tok, rounds: int, device, dtype, **options) -> None:
    from ds_infer import LLM, SamplingParams

    rng = random.Random(2)
    system = workload(tok, 1, seed=3, prompt_range=(192, 192))[0][0]
    questions = [workload(tok, 1, seed=10 + i, prompt_range=(8, 24))[0][0] for i in range(24)]
    prompts = [system + q for q in questions]
    rng.shuffle(prompts)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    outs, rates = {}, {}
    llms = {c: LLM(model_dir, enable_prefix_caching=c, device=device, dtype=dtype, **options) for c in (True, False)}
    for _ in range(rounds):
        for caching in (True, False):
            llm = llms[caching]
            bm = llm.engine.block_manager
            q0, h0 = bm.prefix_queries, bm.prefix_hits
            start, cpu0 = time.perf_counter(), time.process_time()
            res = llm.generate(prompts, params)
            times[caching].append(time.perf_counter() - start)
            cpu[caching].append(time.process_time() - cpu0)
            outs[caching] = [o.outputs[0].token_ids for o in res]
            rates[caching] = (bm.prefix_hits - h0) / max(1, bm.prefix_queries - q0)
            # a fresh cache each round, so every round measures the same thing
            llms[caching] = None  # free the old cache first
            llms[caching] = LLM(model_dir, enable_prefix_caching=caching, device=device, dtype=dtype, **options)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    speedup = statistics.median(b / a for a, b in zip(times[True], times[False]))
    speedup_cpu = statistics.median(b / a for a, b in zip(cpu[True], cpu[False]))
    print(f"\nprefix caching: {len(prompts)} requests sharing a {len(system)}-token system prompt, 16 tokens each")
    print(f"  hit rate {rates[True]:.1%} of prompt tokens; batch {on * 1e3:.0f} ms with caching vs "
          f"{off * 1e3:.0f} ms without: {speedup:.2f}x wall, {speedup_cpu:.2f}x CPU time; "
          f"outputs identical: {outs[True] == outs[False]}")


def try_vllm(model_dir, work) -> dict | None:
    try:
        from vllm import LLM as VLLM
        from vllm import SamplingParams as VParams
    except Exception as exc:  # noqa: BLE001 - any failure means: no vLLM here
        print(f"  vLLM: not available ({type(exc).__name__}: {exc})")
        return None
    llm = VLLM(model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.5)
    prompts = [{"prompt_token_ids": p} for p, _ in work]
    params = [VParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate(prompts[:2], params[:2])
    start = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - start
    return {"tok_s": sum(n for _, n in work) / wall, "tok_cpu_s": float("nan"), "wall": wall, "ttft": [], "itl": []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", default="8,32", help="static batch sizes of the hf-static baselines (default 8,32: "
                                                  "32 puts every request of the default run in one batch)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both systems)")
    p.add_argument("--quick", action="store_true", help="8 requests, 1 round (a smoke run)")
    p.add_argument("--no-http", action="store_true", help="skip the run through the HTTP server")
    args = p.parse_args()
    if args.quick:
        args.requests, args.rounds = 8, 1
    batches = [int(b) for b in str(args.batch).split(",")]
    torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    from ds_infer import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        tok = build_model_dir(model_dir)
        work = workload(tok, args.requests)
        print(f"bench_serve: {args.requests} requests, prompts {min(len(p) for p, _ in work)}-"
              f"{max(len(p) for p, _ in work)} tokens, outputs {min(n for _, n in work)}-{max(n for _, n in work)} "
              f"tokens ({sum(n for _, n in work)} in all); {args.threads} thread(s); medians of {args.rounds} rounds")

        hf = LlamaForCausalLM.from_pretrained(model_dir).eval()
        llm = LLM(model_dir, device="cpu")
        run_ds(llm, work[:2])  # warm-up
        server = None
        if not args.no_http:
            from ds_infer.serving import LLMEngine, start_server

            net = llm.engine.model
            server = start_server(LLMEngine(net, llm.get_tokenizer(), llm.config), model_name="bench")
            run_http(server, work[:2])
        try:
            results = compare(llm, hf, tok, work, args.rounds, batches, "cpu", server)
        finally:
            if server is not None:
                server.stop()
        report("CPU (fp32)", results)
        prefix_section(model_dir, tok, args.rounds, "cpu", None)

        if torch.cuda.is_available():
            cuda_section(args.requests, args.rounds, batches)
        else:
            print("\nCUDA: no GPU here; the CUDA section runs where torch.cuda.is_available()")


def cuda_section(requests: int = 32, rounds: int = 3, batches=(8, 32)) -> dict[str, dict[str, float]]:
    """The comparison on the GPU (bf16) with a larger model (8 layers, hidden 1024, ~100M parameters),
    vLLM too when it imports; prints the table and returns each system's medians (tokens/s, TTFT and
    inter-token p50/p95 in seconds) for scripts that collect GPU figures."""
    from transformers import LlamaForCausalLM

    from ds_infer import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        tok = build_model_dir(model_dir, hidden=1024, layers=8, heads=16, kv_heads=8)
        work = workload(tok, requests)
        hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()
        # a bounded KV cache: HF and vLLM share the device in the same run
        llm = LLM(model_dir, device="cuda", dtype=torch.bfloat16, kv_memory="4GiB")
        run_ds(llm, work[:2])
        results = compare(llm, hf, tok, work, rounds, list(batches), "cuda")
        vllm = try_vllm(model_dir, work)
        if vllm is not None:
            results["vllm"] = [vllm]
        report(f"CUDA (bf16, {torch.cuda.get_device_name()}, 8 layers, hidden 1024)", results)
        prefix_section(model_dir, tok, rounds, "cuda", torch.bfloat16, kv_memory="2GiB")
    return {name: {"tok_s": statistics.median(r["tok_s"] for r in runs),
                   "ttft_p50": statistics.median(pct(r["ttft"], .5) for r in runs),
                   "ttft_p95": statistics.median(pct(r["ttft"], .95) for r in runs),
                   "itl_p50": statistics.median(pct(r["itl"], .5) for r in runs),
                   "itl_p95": statistics.median(pct(r["itl"], .95) for r in runs)}
            for name, runs in results.items()}


if __name__ == "__main__":
    main()
