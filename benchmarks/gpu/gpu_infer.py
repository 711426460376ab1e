"""Inference and serving rows of the GPU run (``benchmarks/gpu/run.py`` calls each with the report).

- **infer**: bf16 decode of a random TinyLlama-1.1B-shaped Llama at batch 1 and 8: ``init_inference``
  with the static-KV-cache decoder captured in a CUDA graph, against ``transformers``' ``generate``
  with its dynamic cache and with its static cache (tokens/s; prefill excluded, as in
  ``benchmarks/bench_infer.py``).
- **serve**: ``bench_serve.cuda_section``: the offline ``ds_infer.LLM`` (paged KV cache, continuous
  batching) against transformers run one request at a time and in static batches of 32, on a
  ~100M-parameter Llama in bf16 (generated tokens/s; time to first token).

A dry run builds the same pieces at a tiny size on the CPU and runs them once.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_infer, bench_serve


def _row():
    from run import Row

    return Row


def bench_infer_decode(report, device: str, dry: bool) -> None:
    import bench_infer as bi

    import ds_infer

    Row = _row()
    preset, dtype = ("tiny", torch.float32) if dry else ("1b", torch.bfloat16)
    new, rounds = (4, 1) if dry else (64, 3)
    hf = bi.build_hf(preset, dtype).to(device)
    ours = ds_infer.init_inference(hf, replace_with_kernel_inject=True, dtype=dtype,
                                   enable_cuda_graph=not dry)

    def synced(fn):
        def run(prompt, n):
            fn(prompt, n)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    systems = {"ours": synced(bi.ours_generate(ours)), "hf-dynamic": synced(bi.hf_generate(hf)),
               "hf-static": synced(bi.hf_generate(hf, static=True))}
    label = "CUDA graph" if not dry else "eager"
    for batch in (1, 8):
        prompt = torch.randint(3, hf.config.vocab_size, (batch, 32), device=device)
        for fn in systems.values():  # warm-up: capture, cache allocation, kernels
            fn(prompt, 3)
            fn(prompt, new + 1)
        ms = {name: [] for name in systems}
        for _ in range(rounds):
            for name, fn in systems.items():
                ms[name].append(bi.ms_per_token(fn, prompt, new)[0])
        tok_s = {name: batch * 1e3 / statistics.median(v) for name, v in ms.items()}
        for base in ("hf-dynamic", "hf-static"):
            report.add(Row("infer", f"decode {preset} {str(dtype)[6:]} batch {batch} ({label})", tok_s["ours"],
                           tok_s[base], "tok/s", f"HF generate {base[3:]} cache"))
    del ours, hf
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_serving(report, device: str, dry: bool) -> None:
    import bench_serve as bs

    Row = _row()
    if dry:
        import tempfile

        from transformers import LlamaForCausalLM

        from ds_infer import LLM

        with tempfile.TemporaryDirectory() as tmp:
            tok = bs.build_model_dir(Path(tmp), hidden=64, layers=2, heads=4, kv_heads=2)
            work = bs.workload(tok, 4, output_range=(2, 4))
            hf = LlamaForCausalLM.from_pretrained(tmp).eval()
            llm = LLM(tmp, device="cpu")
            runs = bs.compare(llm, hf, tok, work, 1, [4], "cpu")
        results = {name: {"tok_s": statistics.median(r["tok_s"] for r in v),
                          "ttft_p50": statistics.median(bs.pct(r["ttft"], .5) for r in v) if v[0]["ttft"] else None}
                   for name, v in runs.items()}
        best = "hf-static4"
    else:
        results = bs.cuda_section(requests=32, rounds=2, batches=(8, 32))
        best = "hf-static32"
    ds = results["ds"]
    report.add(Row("serve", "offline LLM, mixed lengths", ds["tok_s"], results["hf-seq"]["tok_s"], "tok/s",
                   "HF generate one request at a time"))
    report.add(Row("serve", "offline LLM, mixed lengths", ds["tok_s"], results[best]["tok_s"], "tok/s",
                   f"HF generate, static batches ({best[9:]})"))
    if "vllm" in results:
        report.add(Row("serve", "offline LLM, mixed lengths", ds["tok_s"], results["vllm"]["tok_s"], "tok/s", "vLLM"))
    if ds.get("ttft_p50") is not None:
        report.add(Row("serve", "time to first token p50", ds["ttft_p50"] * 1e3, None, "ms"))


SECTIONS: dict = {"infer": bench_infer_decode, "serve": bench_serving}
