"""init_inference: DeepSpeed's keys, and bad input answered with the value, the rule and the fix —
before any weight is read where the config alone decides."""

from __future__ import annotations

import json

import pytest
import torch

import ds_infer
from ds_core.errors import ConfigError
from ds_infer.generation import GenerationError
from ds_infer.models.sources import SafetensorsDir
from tests.ds_infer._hf import make, prompts

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make("llama").save_pretrained(path)
    return path


@pytest.fixture
def no_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a weight was read before the configuration was rejected")

    monkeypatch.setattr(SafetensorsDir, "read", fail)


def test_tp_size_that_cannot_split_the_heads_fails_before_loading(saved, no_reads):
    with pytest.raises(ConfigError, match=r"tp_size 3 does not divide num_attention_heads 8.*\[1, 2, 4, 8\]"):
        ds_infer.init_inference(str(saved), tensor_parallel={"tp_size": 3})


def test_tp_needs_the_ranks(saved, no_reads):
    with pytest.raises(ConfigError, match="tp_size 2 needs torch.distributed"):
        ds_infer.init_inference(str(saved), tensor_parallel={"tp_size": 2})


def test_unsupported_dtype_and_quant_combinations(saved, tmp_path, no_reads):
    with pytest.raises(ConfigError, match="dtype=torch.int8 asks for int8 weights but quant='int4'"):
        ds_infer.init_inference(str(saved), dtype=torch.int8, quant="int4")
    with pytest.raises(ConfigError, match="quant bits 3 is not supported"):
        ds_infer.init_inference(str(saved), quant={"bits": 3})
    with pytest.raises(ConfigError, match="quant 'int3' is not a quantization setting"):
        ds_infer.init_inference(str(saved), quant="int3")
    with pytest.raises(ConfigError, match="dtype torch.float64 is not a compute dtype"):
        ds_infer.init_inference(str(saved), dtype=torch.float64)
    quantized = tmp_path / "q"
    quantized.mkdir()
    for f in saved.iterdir():
        (quantized / f.name).write_bytes(f.read_bytes())
    (quantized / "ds_quant.json").write_text(json.dumps({"format": "ds-quant", "version": 1, "modules": {}}))
    with pytest.raises(ConfigError, match="already quantized"):
        ds_infer.init_inference(str(quantized), quant="int8")


def test_max_new_tokens_beyond_max_out_tokens(saved):
    engine = ds_infer.init_inference(str(saved), max_out_tokens=32)
    with pytest.raises(GenerationError, match=r"prompt length 10 \+ max_new_tokens 30 = 40 exceeds max_out_tokens 32"):
        engine.generate(prompts(1, 10), max_new_tokens=30)


def test_config_keys_are_checked_and_deepspeed_spellings_accepted(saved, tmp_path):
    with pytest.raises(ConfigError, match="'replace_with_kernel_injection'.*did you mean 'replace_with_kernel_inject'"):
        ds_infer.init_inference(str(saved), replace_with_kernel_injection=True)
    with pytest.raises(ConfigError, match="'max_out_tokens' is 64 in the config and 128 as a keyword"):
        ds_infer.init_inference(str(saved), {"max_out_tokens": 64}, max_out_tokens=128)
    config = tmp_path / "ds_inference.json"  # a DeepSpeed inference config file, with keys we ignore
    config.write_text(json.dumps({"tensor_parallel": {"tp_size": 1}, "dtype": "fp32", "replace_with_kernel_inject": True,
                                  "triangular_masking": True, "max_out_tokens": 96, "enable_cuda_graph": False}))
    engine = ds_infer.init_inference(str(saved), config=str(config))
    assert engine.config.max_out_tokens == 96 and engine.module.dtype == torch.float32
    assert ds_infer.init_inference(str(saved), mp_size=1).tp_size == 1


def test_kernel_injection_of_an_unknown_module_names_what_is_supported():
    net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(ConfigError, match="Sequential has no native implementation.*replace_with_kernel_inject=False"):
        ds_infer.init_inference(net, replace_with_kernel_inject=True)
    engine = ds_infer.init_inference(net)  # as it is: our loop over its own forward
    assert engine.generate(torch.tensor([[1, 2]]), max_new_tokens=3).shape == (1, 5)


def test_engine_forward_and_dtype(saved):
    engine = ds_infer.init_inference(str(saved), dtype="bf16")
    assert engine.module.dtype == torch.bfloat16
    ids = prompts(2, 5)
    assert engine(ids).shape == (2, 5, 256) and engine(ids).dtype == torch.float32
    assert engine.load_seconds > 0 and engine.weight_bytes() > 0
