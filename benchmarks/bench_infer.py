"""ds-infer decode and prefill speed against Hugging Face transformers, measured in the same run.

    python benchmarks/bench_infer.py [--preset small] [--new 64] [--rounds 3] [--threads 1]
                                     [--no-compile] [--no-tp]
                                     [--sections decode,linears,prefill,quant,tp,cuda]

One random Llama-architecture model (GQA; ``--preset`` tiny/small/medium, see PRESETS) in fp32 on CPU:

- **decode** ms/token at batch 1 and 8: ``init_inference(model, replace_with_kernel_inject=True)``
  (eager static-cache decoder; ``compile=True``: the step compiled ahead of time by AOTInductor;
  ``compile={"fullgraph": True}``: the step under ``torch.compile``) against ``model.generate``
  with transformers' dynamic cache and with its static cache + ``torch.compile``. ms/token is
  ``(t(1 + N new tokens) - t(1 new token)) / N``: prefill excluded, every token generated (no eos).
  At batch 1 it also prints the weight bytes read per token against this thread's measured memory
  read bandwidth (a 256 MiB sum): the floor for a model whose weights do not fit the caches.
- **linears**: every dense product of one decode step of the preset (q/k/v, o, gate/up, down per
  layer and the head; 1, 2, 4, 8 and 16 rows), summed: ds-ops' ``decode_linear`` (what the CPU
  decoder runs with ``replace_with_kernel_inject=True``) against ``F.linear`` with the weights in
  PyTorch's layout (what transformers runs) and stored transposed (the decoder's layout without
  ds-ops), CPU-ms per step, best of the rounds.
- **prefill** tokens/s for a 512-token prompt: our forward vs transformers' forward.
- **quant**: int8 (per channel) and int4 (group 64) weight-only decode ms/token vs fp32, ours, on
  ``--quant-preset`` (default medium: weights too large for the CPU caches, as in real use).
- **tp**: tp = 2 on 2 gloo ranks (1 thread each) vs tp = 1 on one rank, decode ms/token.
- **cuda**: when a GPU is visible, decode in bf16 on it (``--cuda-preset``, default a 1.1B Llama)
  at batch 1 and 8: HF generate vs ours eager and with the step in a CUDA graph, tokens/s, the
  weight bandwidth achieved against a measured device copy, and the gpt-fast-style figure (70% of
  that bandwidth spent reading weights) for the same model size.

Variants are interleaved round by round (the machine is shared) and medians printed with ratios
``ours / baseline`` (< 1 is faster), for the wall clock and for this process's CPU time (steadier
when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

PRESETS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
    "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=4),
    # TinyLlama-1.1B's shape: the CUDA section's default
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


def build_hf(preset: str, dtype=torch.float32):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**PRESETS[preset], max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def params_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ms_per_token(generate, prompt, new: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds per decoded token. CPU time counts only this process's own work, so on
    a machine shared with other jobs it varies far less than the wall clock (one thread: CPU <= wall)."""
    w0, c0 = time.perf_counter(), time.process_time()
    generate(prompt, 1)
    w1, c1 = time.perf_counter(), time.process_time()
    generate(prompt, new + 1)
    w2, c2 = time.perf_counter(), time.process_time()
    return ((w2 - w1) - (w1 - w0)) / new * 1e3, ((c2 - c1) - (c1 - c0)) / new * 1e3


def hf_generate(model, static: bool = False):
    def run(prompt, n):
        kwargs = dict(cache_implementation="static") if static else {}
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    return run


def ours_generate(engine):
    def run(prompt, n):
        engine.generate(prompt, max_new_tokens=n, eos_token_id=None)
    return run


def report(title: str, rows: dict[str, list], baseline: str, unit: str = "ms/token") -> None:
    """Medians of (wall, CPU) pairs (or plain numbers) with their ratio to ``baseline``."""
    print(f"\n{title}")
    pairs = {name: [v if isinstance(v, tuple) else (v, v) for v in values] for name, values in rows.items()}
    base_w = statistics.median(w for w, _ in pairs[baseline])
    base_c = statistics.median(c for _, c in pairs[baseline])
    for name, values in pairs.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        spread = f"{min(w for w, _ in values):.2f}-{max(w for w, _ in values):.2f}"
        cpu_spread = f"{min(c for _, c in values):.2f}-{max(c for _, c in values):.2f}"
        print(f"  {name:34s} wall {wall:8.2f} {unit} (runs {spread}) ratio {wall / base_w:5.2f} | "
              f"CPU {cpu:8.2f} (runs {cpu_spread}) ratio {cpu / base_c:5.2f}")


def _read_bandwidth() -> float:
    """This thread's memory read bandwidth in bytes/s: summing a 256 MiB fp32 tensor (8x the
    largest last-level cache seen here, so it comes from DRAM), best of 5 in CPU time."""
    big = torch.ones(64 << 20)
    big.sum()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        big.sum()
        best = min(best, time.process_time() - start)
    return big.numel() * 4 / best


def decode_section(args) -> None:
    import ds_infer

    hf = build_hf(args.preset)
    print(f"model: Llama {args.preset}, {params_of(hf) / 1e6:.1f}M parameters, fp32, CPU, "
          f"{torch.get_num_threads()} thread(s)")
    ours = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    compiled = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile=True) if args.compile else None
    dynamo = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile={"fullgraph": True}) \
        if args.compile else None
    hf_static = None
    if args.compile:
        hf_static = build_hf(args.preset)
        hf_static.forward = torch.compile(hf_static.forward, fullgraph=True, dynamic=False)
    for batch in (1, 8):
        prompt = torch.randint(3, hf.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
        variants = {"HF generate (dynamic cache)": hf_generate(hf), "ds_infer (eager)": ours_generate(ours)}
        if compiled is not None:
            variants["ds_infer (compile=True)"] = ours_generate(compiled)
            variants["ds_infer (torch.compile)"] = ours_generate(dynamo)
            variants["HF static cache + torch.compile"] = hf_generate(hf_static, static=True)
        for fn in variants.values():  # warm up (and compile) outside the timed rounds
            fn(prompt, 3)
            fn(prompt, args.new + 1)
        rows = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                rows[name].append(ms_per_token(fn, prompt, args.new))
        report(f"decode, batch {batch}, {args.new} new tokens after a 32-token prompt", rows,
               "HF generate (dynamic cache)")
        if batch == 1:  # a batch-1 step reads every weight once: how close is it to the memory's limit?
            embedding = hf.get_input_embeddings().weight  # only the prompt's rows of it are read
            nbytes = sum(p.numel() * p.element_size() for p in hf.parameters() if p is not embedding)
            bandwidth = _read_bandwidth()
            best = min(min(c for _, c in v) for k, v in rows.items() if k.startswith("ds_infer"))
            print(f"  weights {nbytes / 1e6:.1f} MB read per token; fastest ds_infer round {best:.2f} CPU-ms/token = "
                  f"{nbytes / best / 1e6:.1f} GB/s; one thread reads memory at {bandwidth / 1e9:.1f} GB/s "
                  f"(a 256 MiB sum), so at that rate a token costs >= {nbytes / bandwidth * 1e3:.2f} ms "
                  "(less while the weights fit the caches)")


def linears_section(args) -> None:
    from ds_core.ops import get_op

    op = get_op("decode_linear")
    if op is None:
        print("\nlinears: skipped, ds-ops is not installed (no decode_linear op)")
        return
    hf = build_hf(args.preset)
    qkv: dict[str, list] = {}  # the native model fuses q/k/v and gate/up into single products: time those shapes
    for name, m in hf.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            qkv.setdefault(name.rsplit(".", 1)[0], []).append(m.weight.detach())
    fused = [torch.cat(ws) for ws in qkv.values()]
    weights = fused + [m.weight.detach() for name, m in hf.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.endswith(("o_proj", "down_proj", "lm_head"))]
    transposed = [w.t().contiguous().t() for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    print(f"\nlinears: the {len(weights)} dense products of one decode step of Llama {args.preset} "
          f"({nbytes / 1e6:.1f} MB of weights), CPU-ms per step, best of {max(args.rounds, 5)} rounds")

    def once(fn, ws, xs) -> float:
        start = time.process_time()
        for w in ws:
            fn(xs[w.shape[1]], w)
        return (time.process_time() - start) * 1e3

    with torch.inference_mode():
        for rows in (1, 2, 4, 8, 16):
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            variants = {"ours": (lambda x, w: op(x, w, None), weights),
                        "plain": (torch.nn.functional.linear, weights),
                        "transposed": (torch.nn.functional.linear, transposed)}
            for fn, ws in variants.values():
                fn(xs[ws[0].shape[1]], ws[0])  # warm up (the first decode_linear call builds the kernel)
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(max(args.rounds, 5)):  # interleaved round by round, like the other sections
                for name, (fn, ws) in variants.items():
                    best[name] = min(best[name], once(fn, ws, xs))
            ours, plain, trans = best["ours"], best["plain"], best["transposed"]
            print(f"  {rows:2d} rows: decode_linear {ours:6.2f} | F.linear {plain:6.2f} (ratio {ours / plain:4.2f}) | "
                  f"F.linear, transposed storage {trans:6.2f} (ratio {ours / trans:4.2f})")


def prefill_section(args) -> None:
    import ds_infer

    hf = build_hf(args.preset)
    ours = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    prompt = torch.randint(3, hf.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    rows = {"HF forward": [], "ds_infer prefill": []}

    def hf_prefill():
        with torch.inference_mode():
            hf(prompt, use_cache=True, logits_to_keep=1)

    def our_prefill():
        ours.decoder().prefill(prompt, None, 1)

    for fn in (hf_prefill, our_prefill):
        fn()
    for _ in range(args.rounds):
        for name, fn in (("HF forward", hf_prefill), ("ds_infer prefill", our_prefill)):
            t = time.perf_counter()
            fn()
            rows[name].append(512 / (time.perf_counter() - t))
    print("\nprefill, 512-token prompt (tokens/s, higher is better; ratio is ours/HF)")
    for name, values in rows.items():
        print(f"  {name:34s} {statistics.median(values):9.0f} tokens/s  "
              f"ratio {statistics.median(values) / statistics.median(rows['HF forward']):5.2f}")


def quant_section(args) -> None:
    import ds_infer

    hf = build_hf(args.quant_preset)
    print(f"\nquantization model: Llama {args.quant_preset}, {params_of(hf) / 1e6:.1f}M parameters (large enough for "
          "decoding to read its weights from memory, not cache)")
    engines = {"fp32": ds_infer.init_inference(hf, replace_with_kernel_inject=True),
               "int8 (per channel)": ds_infer.init_inference(hf, replace_with_kernel_inject=True, quant="int8"),
               "int4 (group 64)": ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                                          quant={"bits": 4, "group_size": 64})}
    for batch in (1, 8):
        prompt = torch.randint(3, hf.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(1))
        fns = {name: ours_generate(e) for name, e in engines.items()}
        for fn in fns.values():
            fn(prompt, 3)
        rows = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                rows[name].append(ms_per_token(fn, prompt, args.new))
        report(f"weight-only quantization, batch {batch} (ours)", rows, "fp32")
    for name, e in engines.items():
        print(f"  weights held: {name:20s} {e.weight_bytes() / 2**20:8.1f} MiB")


def _tp_worker(preset: str, new: int, rounds: int) -> list[float]:
    import torch.distributed as dist

    import ds_infer

    torch.set_num_threads(1)
    hf = build_hf(preset)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, tensor_parallel={"tp_size": 2})
    prompt = torch.randint(3, hf.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    fn = ours_generate(engine)
    fn(prompt, 3)
    out = []
    for _ in range(rounds):
        dist.barrier()
        out.append(ms_per_token(fn, prompt, new))
    return out


def tp_section(args) -> None:
    import ds_infer
    from ds_core.testing import run_distributed

    torch.set_num_threads(1)
    hf = build_hf(args.preset)
    single = ours_generate(ds_infer.init_inference(hf, replace_with_kernel_inject=True))
    prompt = torch.randint(3, hf.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    single(prompt, 3)
    one = [ms_per_token(single, prompt, args.new) for _ in range(args.rounds)]
    two = run_distributed(_tp_worker, 2, args=(args.preset, args.new, args.rounds), timeout=1800)
    report("tensor parallel, batch 1, 1 thread per rank", {"tp=1, 1 rank": one, "tp=2, 2 gloo ranks": two[0]},
           "tp=1, 1 rank")


def _copy_bandwidth() -> float:
    """Device memory bandwidth measured with a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 5 / (time.perf_counter() - start)


def cuda_section(args) -> None:
    if not torch.cuda.is_available():
        print("\ncuda: no CUDA device visible; section skipped")
        return
    import ds_infer

    preset = args.cuda_preset
    hf = build_hf(preset, torch.bfloat16).cuda()
    nbytes = params_of(hf) * 2
    print(f"\nCUDA ({torch.cuda.get_device_name()}): Llama {preset}, {params_of(hf) / 1e9:.2f}B parameters, bf16")
    graph = ds_infer.init_inference(hf, replace_with_kernel_inject=True, dtype=torch.bfloat16, enable_cuda_graph=True)
    eager = ds_infer.init_inference(hf, replace_with_kernel_inject=True, dtype=torch.bfloat16)
    bandwidth = _copy_bandwidth()

    def sync(fn):
        def run(p, n):
            fn(p, n)
            torch.cuda.synchronize()
        return run

    for batch in (1, 8):
        prompt = torch.randint(3, hf.config.vocab_size, (batch, 32), device="cuda")
        fns = {"HF generate (dynamic cache)": sync(hf_generate(hf)), "ds_infer (eager)": sync(ours_generate(eager)),
               "ds_infer (CUDA graph)": sync(ours_generate(graph))}
        for fn in fns.values():
            fn(prompt, 3)
            fn(prompt, args.new + 1)
        rows = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                rows[name].append(ms_per_token(fn, prompt, args.new))
        report(f"CUDA bf16 decode, batch {batch}", rows, "HF generate (dynamic cache)")
        best = statistics.median(wall for wall, _ in rows["ds_infer (CUDA graph)"])
        achieved = nbytes / (best / 1e3)
        print(f"  ds_infer (CUDA graph): {batch * 1e3 / best:,.0f} tokens/s; weights read at {achieved / 1e9:,.0f} GB/s "
              f"= {achieved / bandwidth:.0%} of the measured copy bandwidth ({bandwidth / 1e9:,.0f} GB/s)")
    # gpt-fast (PyTorch's reference decoder) reads its weights at ~70% of peak bandwidth at batch 1
    # (Llama-2-7B bf16 on A100-80GB: 104.9 tokens/s x 13.5 GB); the same fraction of this device:
    print(f"  gpt-fast-style figure for this model size: ~{0.7 * bandwidth / nbytes:,.0f} tokens/s at batch 1 "
          "(70% of the measured bandwidth spent on weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quant-preset", default="medium", choices=sorted(PRESETS))
    parser.add_argument("--cuda-preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--sections", default="decode,linears,prefill,quant,tp,cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = args.sections.split(",")
    for name in ("decode", "linears", "prefill", "quant", "tp", "cuda"):
        if name in sections:
            globals()[f"{name}_section"](args)


if __name__ == "__main__":
    main()
