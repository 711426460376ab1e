"""Quantized weights: perplexity of a GPT trained here, the ds-quant reader, quantize-on-load, bnb.

Perplexity is measured on held-out text after training a small GPT on this repository's docs (so it
means something: the fp32 model reaches ~27, far below the 256-way uniform perplexity). Bounds:
int8 per-channel within 0.5% of fp32 (measured +0.01%); int4 with groups of 64 within 2%
(round-to-nearest, no calibration; measured +0.02% to +0.2% over runs); bitsandbytes NF4 within 5%
(measured +0.05%). The
reader is checked against a reference model holding the dense weights the codes stand for: logits
within 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ds_infer
from ds_core.testing.models import GPT, GPTConfig
from tests.ds_infer import _dsquant

ROOT = Path(__file__).resolve().parents[2]
SEQ = 64


@pytest.fixture(scope="module")
def trained():
    text = b"\n".join(p.read_bytes() for p in sorted((ROOT / "docs").glob("*.md")))[:400_000]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, seq_len=SEQ, dim=64, layers=2, heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(train) - SEQ - 1, (16,), generator=g)
        x = torch.stack([train[s:s + SEQ] for s in starts])
        y = torch.stack([train[s + 1:s + SEQ + 1] for s in starts])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    windows = held[: (len(held) - 1) // SEQ * SEQ + 1]
    x = windows[:-1].view(-1, SEQ)[:64]
    y = windows[1:].view(-1, SEQ)[:64]
    return model, x, y


def perplexity(engine, x, y) -> float:
    logits = engine(x)
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())


@pytest.fixture(scope="module")
def fp32_ppl(trained):
    model, x, y = trained
    ppl = perplexity(ds_infer.init_inference(model, replace_with_kernel_inject=True), x, y)
    assert ppl < 40, f"the GPT did not learn (perplexity {ppl:.1f}); the quantization bounds would be meaningless"
    return ppl


def test_int8_perplexity_within_half_a_percent(trained, fp32_ppl):
    model, x, y = trained
    engine = ds_infer.init_inference(model, replace_with_kernel_inject=True, quant="int8")
    assert type(engine.module.transformer.h[0].attn.qkv_proj).__name__ == "QuantLinear"
    assert perplexity(engine, x, y) <= fp32_ppl * 1.005


def test_int4_group64_perplexity_within_two_percent(trained, fp32_ppl):
    model, x, y = trained
    engine = ds_infer.init_inference(model, replace_with_kernel_inject=True, quant={"bits": 4, "group_size": 64})
    ppl = perplexity(engine, x, y)
    assert ppl <= fp32_ppl * 1.02, (ppl, fp32_ppl)


def test_ds_quant_checkpoint_is_packed_and_reads_back(trained, tmp_path):
    """Written per docs/quantized-format.md, loaded through init_inference(checkpoint=...)."""
    from safetensors.torch import save_file

    model, x, _ = trained
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # tied to tok.weight
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "fp32.safetensors"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    sizes = {}
    for bits, group in ((8, -1), (4, 64)):
        out = tmp_path / f"int{bits}"
        dense = _dsquant.write(state, {n: {"bits": bits, "group_size": group} for n in linears}, out)
        sizes[bits] = (out / "model.safetensors").stat().st_size
        with torch.device("meta"):
            shell = GPT(model.cfg)
        engine = ds_infer.init_inference(shell, checkpoint=str(out), replace_with_kernel_inject=True)
        ref = GPT(model.cfg).eval()
        ref.load_state_dict({**model.state_dict(), **dense})
        with torch.no_grad():
            torch.testing.assert_close(engine(x[:4]), ref(x[:4]), atol=1e-4, rtol=0)
    fp32 = (tmp_path / "fp32.safetensors").stat().st_size
    linear_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in linears)
    # the linear weights shrink 4x (int8) and ~7x (int4 + scales); embeddings/norms stay fp32
    assert fp32 - sizes[8] > 0.7 * linear_bytes
    assert fp32 - sizes[4] > 0.82 * linear_bytes


def _llama():
    from tests.ds_infer._hf import make

    return make("llama", init_std=0.05)


LAYOUTS = {  # every corner of the format on one model: mixed q/k/v schemes cannot be fused
    "self_attn.q_proj": {"bits": 4, "group_size": 32},
    "self_attn.k_proj": {"bits": 8, "group_size": 16, "symmetric": False},
    "self_attn.v_proj": {"bits": 2, "group_size": 32},  # ternary
    "self_attn.o_proj": {"bits": 4, "group_size": 16, "perm": True},  # GPTQ act-order
    "mlp.gate_proj": {"bits": 1, "group_size": 32},  # binary
    "mlp.up_proj": {"bits": 4, "group_size": 64, "symmetric": False},
    "mlp.down_proj": {"bits": 8, "group_size": -1, "perm": True},
}


def test_reader_covers_every_layout_of_the_format(tmp_path):
    from tests.ds_infer._hf import prompts

    hf = _llama()
    schemes = {f"model.layers.{i}.{k}": v for i in range(2) for k, v in LAYOUTS.items()}
    dense = _dsquant.write(hf.state_dict(), schemes, tmp_path, config=hf.config.to_dict(), shards=3)
    engine = ds_infer.init_inference(str(tmp_path))
    qkv = engine.module.model.layers[0].self_attn.qkv_proj
    assert type(qkv).__name__ == "ConcatLinear"  # three schemes: three layers side by side
    assert engine.module.model.layers[0].self_attn.o_proj.perm is not None
    ref = _llama()
    ref.load_state_dict({**hf.state_dict(), **dense})
    ids = prompts(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dynamic", [True, False])
def test_w8a8_activations_are_quantized_before_the_gemm(tmp_path, dynamic):
    """ZeroQuant W8A8: int8 codes per token (dynamic) or with a stored step (static)."""
    from tests.ds_infer._hf import prompts

    hf = _llama()
    names = [f"model.layers.{i}.{k}" for i in range(2) for k in LAYOUTS]
    schemes = {n: {"bits": 8, "group_size": -1} for n in names}
    steps = {n: 0.02 for n in names}
    dense = _dsquant.write(hf.state_dict(), schemes, tmp_path, config=hf.config.to_dict(),
                           activations={"bits": 8, "dynamic": dynamic, "granularity": "token", "symmetric": True},
                           act_scales=None if dynamic else steps)
    engine = ds_infer.init_inference(str(tmp_path))
    ref = _llama()
    ref.load_state_dict({**hf.state_dict(), **dense})

    def fake_quant(module, args):
        (x,) = args
        step = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127 if dynamic else torch.tensor(0.02)
        return (torch.round(x / step).clamp(-127, 127) * step,)

    for n in names:
        ref.get_submodule(n).register_forward_pre_hook(fake_quant)
    ids = prompts(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_quantize_on_load_packs_weights(trained):
    model, x, _ = trained
    fp32 = ds_infer.init_inference(model, replace_with_kernel_inject=True)
    int8 = ds_infer.init_inference(model, dtype=torch.int8, replace_with_kernel_inject=True)  # DeepSpeed's spelling
    int4 = ds_infer.init_inference(model, replace_with_kernel_inject=True, quant="int4")
    layer = int4.module.transformer.h[0].mlp.c_proj
    assert (layer.bits, layer.group_size, layer.qweight.dtype) == (4, 128, torch.uint8)
    assert int8.weight_bytes() < fp32.weight_bytes() and int4.weight_bytes() < int8.weight_bytes()
    in_place = ds_infer.init_inference(GPT(model.cfg).eval(), quant="int8")  # the module itself, linears swapped
    assert type(in_place.module.blocks[0].qkv).__name__ == "QuantLinear"
    assert type(in_place.module.head).__name__ == "Linear"  # the output head stays dense


def test_bitsandbytes_backend(trained, fp32_ppl):
    pytest.importorskip("bitsandbytes")
    model, x, y = trained
    engine = ds_infer.init_inference(model, replace_with_kernel_inject=True, quant="nf4")
    assert type(engine.module.transformer.h[0].attn.qkv_proj).__name__ == "Linear4bit"
    assert perplexity(engine, x, y) <= fp32_ppl * 1.05
