"""Tensor-parallel serving on 2 gloo ranks: rank 0 schedules and broadcasts each step's plan, both
ranks run their half of the heads and of the KV cache. Reference: the same greedy tokens as Hugging
Face ``generate`` run request by request on the unsharded model (see test_engine.py)."""

from __future__ import annotations

import pytest

from ds_infer.serving.llm import LLM
from ds_infer.serving.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tp_case(tiny_model_dir, hf_reference):
    """Only what the ranks need, small enough to pickle to them."""
    prompts, ids, texts = hf_reference
    return str(tiny_model_dir[0]), prompts[:12], ids[:12], texts[:12]


@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_two_ranks_generate_hf_tokens(tp_case):
    import torch.distributed as dist

    path, prompts, ids, texts = tp_case
    # a small cache and token budget: chunked prefill and preemption happen under tensor parallelism too
    llm = LLM(path, tensor_parallel_size=2, block_size=4, max_num_tokens=24, num_kv_blocks=48, max_model_len=160)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    assert [o.outputs[0].token_ids for o in outs] == ids  # every rank returns rank 0's outputs
    assert [o.outputs[0].text for o in outs] == texts
    if dist.get_rank() == 0:
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.executor.cache.num_kv_heads == 1  # 2 kv heads over 2 ranks
    again = llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=16))  # a second batch
    assert [o.outputs[0].token_ids for o in again] == ids[:2]
    llm.close()
