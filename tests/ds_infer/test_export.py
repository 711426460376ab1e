"""Native models written back as Hugging Face directories load in transformers with the same logits."""

from __future__ import annotations

import pytest
import torch

import ds_infer
from ds_core.testing.models import GPT, GPTConfig
from tests.ds_infer._hf import make, prompts

transformers = pytest.importorskip("transformers")


def test_ds_gpt_is_written_as_a_gpt2_checkpoint(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=256, seq_len=64, dim=64, layers=2, heads=4)).eval()
    engine = ds_infer.init_inference(gpt, replace_with_kernel_inject=True)
    engine.generate(prompts(1, 4), max_new_tokens=2)  # decoding first: the CPU linears become RowsLinear
    ds_infer.save_pretrained(engine, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = prompts(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt(ids), atol=1e-4, rtol=0)
    assert torch.equal(ds_infer.init_inference(str(tmp_path)).generate(ids, max_new_tokens=8),
                       engine.generate(ids, max_new_tokens=8))


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "qwen2_moe"])
def test_round_trip_through_transformers(tmp_path, name):
    hf = make(name)
    ds_infer.save_pretrained(ds_infer.init_inference(hf, replace_with_kernel_inject=True), tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = prompts(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_quantized_models_are_refused(tmp_path):
    from ds_core.errors import ConfigError

    engine = ds_infer.init_inference(make("llama"), replace_with_kernel_inject=True, quant="int8")
    with pytest.raises(ConfigError, match="only dense"):
        ds_infer.save_pretrained(engine, tmp_path)


def test_byte_tokenizer_ids_are_the_utf8_bytes(tmp_path):
    ds_infer.save_byte_tokenizer(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Héllo, wörld\n\t"
    assert tok(text)["input_ids"] == list(text.encode())
    assert tok.decode(list(text.encode())) == text
