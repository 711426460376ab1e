"""ds-compress: quality, size and speed of post-training quantization, in one run.

A small Llama (Hugging Face, built from a config) is trained here on the learnable synthetic
sequences of ``ds_core.testing.models.synthetic_tokens``, then quantized by ds_compress (RTN int8,
RTN int4 g64, GPTQ int4 g64, ZeroQuant W8A8), exported with ``save_quantized`` and run by ds-infer
(``init_inference(model, checkpoint=dir, replace_with_kernel_inject=True)``). Printed per row: held-out
perplexity, size on disk, CPU greedy-decode ms/token (ds-infer's KV-cache decode, 1 thread), and the
GPTQ time per layer. Side by side, torchao's int8 / int4 weight-only quantization of the same model,
where it runs on this CPU (perplexity and the same decode loop through transformers' ``generate``).

    python benchmarks/bench_compress.py [--steps 200] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ds_compress
from ds_core.testing.models import synthetic_tokens

VOCAB, SEQ = 256, 64


def _train(model, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, y = synthetic_tokens(16, SEQ, VOCAB, step)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _ppl(forward) -> float:
    losses = []
    for i in range(4):
        x, y = synthetic_tokens(16, SEQ, VOCAB, 10_000 + i)
        logits = forward(x)
        losses.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1))))
    return math.exp(sum(losses) / len(losses))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def _decode_ms(generate, new_tokens: int = 48) -> float:
    prompt = synthetic_tokens(1, 16, VOCAB, 777)[0]
    generate(prompt, 4)  # warm up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        generate(prompt, new_tokens)
        best = min(best, (time.perf_counter() - start) / new_tokens * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    _train(model, args.steps)
    calib = [synthetic_tokens(16, SEQ, VOCAB, 20_000 + i)[0] for i in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    model.save_pretrained(tmp / "fp32")
    fp32_size = _size(tmp / "fp32")

    try:
        import ds_infer
    except ImportError:
        ds_infer = None

    rows = []

    def infer_row(name, directory, quantized):
        if ds_infer is None:
            return float("nan")
        kwargs = {"checkpoint": str(directory)} if directory is not None else {}
        engine = ds_infer.init_inference(LlamaForCausalLM(cfg) if directory is not None else copy.deepcopy(model),
                                         replace_with_kernel_inject=True, dtype=torch.float32, **kwargs)
        if directory is not None:
            got = engine(calib[0][:2])
            want = quantized(calib[0][:2]).logits
            assert torch.allclose(got, want, atol=1e-4), f"{name}: ds-infer differs from the quantized model"
        return _decode_ms(lambda p, n: engine.generate(p, max_new_tokens=n, do_sample=False))

    fp32_ppl = _ppl(lambda x: model(x).logits)
    rows.append(("fp32 (ds-infer)", fp32_ppl, fp32_size, infer_row("fp32", None, None), None))
    for name, method, kwargs in [("RTN int8", "rtn", {"bits": 8}),
                                 ("RTN int4 g64", "rtn", {"bits": 4, "group_size": 64}),
                                 ("GPTQ int4 g64", "gptq", {"bits": 4, "group_size": 64, "calibration": calib}),
                                 ("ZeroQuant W8A8", "zeroquant", {"bits": 8, "group_size": 64})]:
        start = time.perf_counter()
        q = ds_compress.quantize(copy.deepcopy(model), method, modules=None, **kwargs)
        seconds = time.perf_counter() - start
        out = tmp / name.replace(" ", "_")
        ds_compress.save_quantized(q, out)
        layers = sum(isinstance(m, ds_compress.QuantizedLinear) for m in q.modules())
        per_layer = seconds / layers * 1e3 if method == "gptq" else None
        rows.append((f"{name} (ds-infer)", _ppl(lambda x, q=q: q(x).logits), _size(out), infer_row(name, out, q), per_layer))

    hf_fp32 = _decode_ms(lambda p, n: model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False))
    rows.append(("fp32 (transformers generate)", fp32_ppl, fp32_size, hf_fp32, None))
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        for name, make in [("torchao int8 weight-only", lambda: Int8WeightOnlyConfig()),
                           ("torchao int4 weight-only g64", lambda: Int4WeightOnlyConfig(group_size=64))]:
            try:
                tq = copy.deepcopy(model)
                quantize_(tq, make())
                ppl = _ppl(lambda x, tq=tq: tq(x).logits)
                ms = _decode_ms(lambda p, n, tq=tq: tq.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False))
                rows.append((name + " (transformers generate)", ppl, None, ms, None))
            except Exception as exc:  # report, keep going: torchao's CPU coverage varies by layout
                rows.append((f"{name}: not run on this CPU ({type(exc).__name__}: {str(exc)[:90]})", None, None, None, None))
    except ImportError:
        rows.append(("torchao: not installed (pip install torchao torch==2.13.0)", None, None, None, None))

    print(f"Llama {args.layers} layers, hidden {args.hidden}, vocab {VOCAB}, {args.steps} training steps; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread")
    print(f"{'model':58} {'ppl':>8} {'ppl/fp32':>8} {'disk MB':>8} {'size/fp32':>9} {'ms/token':>9} {'GPTQ ms/layer':>13}")
    for name, ppl, size, ms, per_layer in rows:
        def fmt(v, f):
            return format(v, f) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-"
        print(f"{name:58} {fmt(ppl, '8.3f'):>8} {fmt(ppl / fp32_ppl if ppl else None, '8.4f'):>8} "
              f"{fmt(size / 1e6 if size else None, '8.3f'):>8} {fmt(size / fp32_size if size else None, '9.3f'):>9} "
              f"{fmt(ms, '9.2f'):>9} {fmt(per_layer, '13.1f'):>13}")


if __name__ == "__main__":
    main()
