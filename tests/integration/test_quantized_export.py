"""ds-compress -> ds-quant checkpoint -> ds-infer: a tiny Hugging Face Llama quantized by every
post-training method, saved with ``save_quantized`` and loaded by ``ds_infer.init_inference(model,
checkpoint=out_dir)``, computes the same logits as the fake-quantized model (tolerance 1e-4; both
decode the same codes with the same scales, and measured equal to the last bit on CPU)."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import ds_infer  # noqa: E402
from ds_compress import quantize, save_quantized  # noqa: E402

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CALIB = [torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(CFG).eval()


@pytest.mark.parametrize("method,kwargs", [
    ("rtn", {"bits": 8}),
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": False}),
    ("gptq", {"bits": 4, "group_size": 32, "calibration": CALIB}),
    ("zeroquant", {"bits": 8, "group_size": 64}),
    ("xtc", {"bits": 2, "group_size": 32, "calibration": CALIB, "distill_steps": 2}),
])
def test_ds_infer_runs_the_exported_checkpoint(llama, tmp_path, method, kwargs):
    quantized = quantize(copy.deepcopy(llama), method, **kwargs)
    save_quantized(quantized, tmp_path)
    engine = ds_infer.init_inference(LlamaForCausalLM(CFG), checkpoint=str(tmp_path),
                                     replace_with_kernel_inject=True, dtype=torch.float32)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = quantized(x).logits
        got = engine(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_ds_infer_runs_a_tied_head_gpt_checkpoint(tmp_path):
    """ds-core's GPT: a fused qkv projection and an output head tied to the embedding (kept dense)."""
    from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

    cfg = GPTConfig(vocab_size=64, seq_len=32, dim=64, layers=2, heads=4)
    torch.manual_seed(0)
    calib = [synthetic_tokens(4, 32, 64, i)[0] for i in range(2)]
    quantized = quantize(GPT(cfg).eval(), "gptq", bits=4, group_size=32, calibration=calib)
    save_quantized(quantized, tmp_path)
    engine = ds_infer.init_inference(GPT(cfg), checkpoint=str(tmp_path), replace_with_kernel_inject=True,
                                     dtype=torch.float32)
    x = synthetic_tokens(2, 16, 64, 9)[0]
    with torch.no_grad():
        assert torch.allclose(engine(x), quantized(x), atol=1e-4, rtol=0)
