"""ZeRO-Inference: a model larger than this process's weight budget generates the in-memory tokens.

Reference: the same native model fully in memory (greedy tokens equal; the streamed weights are the
same bytes). The budget counts what the streamer holds: embeddings, head and norms, the layer slots
and the layers it keeps resident.
"""

from __future__ import annotations

import pytest
import torch

import ds_infer
from ds_core.errors import ConfigError
from tests.ds_infer._hf import make, prompts

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    hf = make("llama", num_hidden_layers=6)
    ids = prompts(2, 8)
    ref = ds_infer.init_inference(hf, replace_with_kernel_inject=True).generate(ids, max_new_tokens=24,
                                                                                eos_token_id=None)
    return hf, ids, ref


def test_nvme_streaming_under_a_memory_budget_gives_the_same_tokens(model, tmp_path):
    hf, ids, ref = model
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    layer = sum(p.numel() * p.element_size() for p in hf.model.layers[0].parameters())
    budget = total - 2 * layer  # the whole model does not fit
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                     zero={"offload": "nvme", "nvme_path": str(tmp_path), "memory_budget": budget})
    out = engine.generate(ids, max_new_tokens=24, eos_token_id=None)
    assert torch.equal(out, ref)
    streamer = engine.module.offload
    assert streamer.total_bytes() > budget >= streamer.peak_bytes
    resident = [layer.resident is not None for layer in streamer.layers]
    assert resident[0] and not all(resident)  # the first layers stay, the others are read every step
    assert streamer.fetches >= 24 * resident.count(False)
    assert len(list(tmp_path.glob("layer_*.bin"))) == 6


def test_deepspeed_offload_param_spelling_and_cpu_offload(model, tmp_path):
    hf, ids, ref = model
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                     zero={"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}})
    assert torch.equal(engine.generate(ids, max_new_tokens=24, eos_token_id=None), ref)


def test_released_layer_fails_loudly_and_budget_errors_name_the_numbers(model, tmp_path):
    hf, ids, _ = model
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                     zero={"offload": "nvme", "nvme_path": str(tmp_path), "prefetch": 1})
    layer = engine.module.model.layers[3]
    assert layer.mlp.down_proj.weight.numel() == 0  # not fetched: an empty placeholder
    with pytest.raises(RuntimeError):
        layer.mlp.down_proj(torch.zeros(1, 128))
    with pytest.raises(ConfigError, match=r"memory_budget 1,000 bytes is below the working set"):
        ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                zero={"offload": "nvme", "nvme_path": str(tmp_path / "b"), "memory_budget": 1000})
    with pytest.raises(ConfigError, match="needs zero.nvme_path"):
        ds_infer.init_inference(hf, replace_with_kernel_inject=True, zero={"offload": "nvme"})
