"""Tensor-parallel inference on 2 real gloo ranks against transformers on one process.

Reference: ``hf.generate`` / ``hf(...)`` of the unsharded model on the same weights. Greedy tokens
equal for 64 new tokens; fp32 logits within 1e-4 (each rank sums its heads' share, then one
all-reduce: only the summation order differs).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

CASES = [("llama", {}),  # 8 query heads, 2 KV heads: split over the ranks
         ("llama", {"num_key_value_heads": 1}),  # 1 KV head: replicated on both ranks
         ("qwen2", {}), ("gpt2", {}),
         ("mixtral", {}),  # 4 experts: 2 per rank (expert parallel)
         ("qwen2_moe", {})]


def _model(name, overrides):
    from tests.ds_infer._hf import make, prompts

    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return make(name, **overrides), ids, mask


def _reference(name, overrides, new=64):
    hf, ids, mask = _model(name, overrides)
    with torch.no_grad():
        tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        logits = hf(ids).logits
    return tokens, logits


INT8 = {"bits": 8, "group_size": 32}  # groups inside every shard: the same codes sharded or not


@pytest.fixture(scope="module")
def references():
    """Computed once in the test process and handed to both ranks."""
    import ds_infer

    refs = {i: _reference(*case) for i, case in enumerate(CASES)}
    hf, ids, mask = _model("llama", {"num_key_value_heads": 1})
    refs["int8"] = ds_infer.init_inference(hf, replace_with_kernel_inject=True, quant=INT8).generate(
        ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
    return refs


@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_tp2_greedy_tokens_and_logits_equal_transformers(references):
    import torch.distributed as dist

    import ds_infer

    for i, (name, overrides) in enumerate(CASES):
        hf, ids, mask = _model(name, overrides)
        tokens, logits = references[i]
        engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, tensor_parallel={"tp_size": 2})
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
        assert torch.equal(out, tokens), (name, overrides, dist.get_rank())
        torch.testing.assert_close(engine(ids), logits, atol=1e-4, rtol=0)


@pytest.mark.world_size(2)
def test_tp2_from_checkpoint_each_rank_holds_its_slices(tmp_path, references):
    """A meta-device model + checkpoint=: each rank reads its rows; dense and quantized on load."""
    import torch.distributed as dist
    import transformers

    import ds_infer

    case = CASES.index(("llama", {"num_key_value_heads": 1}))
    hf, ids, mask = _model(*CASES[case])
    tokens = references[case][0]
    if dist.get_rank() == 0:
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
    dist.barrier()
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path))
    engine = ds_infer.init_inference(shell, checkpoint=str(tmp_path), replace_with_kernel_inject=True,
                                     tensor_parallel={"tp_size": 2})
    attn = engine.module.model.layers[0].self_attn
    assert attn.num_heads == 4 and attn.num_kv_heads == 1  # 8 heads over 2 ranks; the one KV head on both
    assert attn.qkv_proj.weight.shape == ((4 + 2) * 8, 64)
    assert engine.module.model.layers[0].mlp.down_proj.weight.shape == (64, 64)  # half of 128 inputs
    assert engine.module.lm_head.weight.shape == (128, 64)  # half the vocabulary
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
    assert torch.equal(out, tokens)

    # int8 on load: each rank quantizes its own shard; with groups that never straddle a shard the
    # codes are those of the unsharded int8 model, so the tokens are too
    int8 = ds_infer.init_inference(shell, checkpoint=str(tmp_path), replace_with_kernel_inject=True,
                                   tensor_parallel={"tp_size": 2}, quant=INT8)
    assert type(int8.module.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    out = int8.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
    assert torch.equal(out, references["int8"])


@pytest.mark.world_size(2)
def test_autotp_in_place_keeps_transformers_generate(references):
    """replace_with_kernel_inject=False: ds-parallel shards the transformers model itself."""
    import ds_infer

    case = CASES.index(("qwen2", {}))
    hf, ids, mask = _model(*CASES[case])
    tokens = references[case][0]
    engine = ds_infer.init_inference(hf, tensor_parallel={"tp_size": 2})
    assert type(engine.module).__name__ == "Qwen2ForCausalLM"
    assert type(engine.module.model.layers[0].self_attn.q_proj).__name__ == "ColumnParallelLinear"
    with torch.no_grad():
        own = engine.module.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
    assert torch.equal(own, tokens)
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None), tokens)
