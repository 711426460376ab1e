"""GPU paths (skipped without a CUDA device): the captured decode step and the Triton int4 GEMM."""

from __future__ import annotations

import pytest
import torch

import ds_infer
from tests.ds_infer._hf import make, prompts

pytest.importorskip("transformers")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_cuda_graph_decode_equals_transformers(name):
    hf = make(name).cuda()
    ids, mask = prompts(2, 10).cuda(), torch.ones(2, 10, dtype=torch.long, device="cuda")
    mask[1, :3] = 0
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    for options in ({}, {"enable_cuda_graph": True}):
        engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, **options)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=None)
        assert torch.equal(out, ref), options
        again = engine.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=None)  # graph replayed
        assert torch.equal(again, ref), options


@pytest.mark.cuda
def test_int4_triton_gemm_and_bf16_decode():
    hf = make("llama", init_std=0.05).cuda()
    ids = prompts(2, 10).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, quant={"bits": 4, "group_size": 32})
    assert (engine(ids) - ref).abs().max() < 0.1 * ref.abs().max()
    bf16 = ds_infer.init_inference(hf, replace_with_kernel_inject=True, dtype=torch.bfloat16, enable_cuda_graph=True)
    assert bf16.generate(ids, max_new_tokens=16, eos_token_id=None).shape == (2, 26)
