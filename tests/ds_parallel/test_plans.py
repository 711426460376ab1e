"""Sharding plans: found from structure, taken from a model's own tp_plan, overridden by name; bad input.

These run in one process: plans are data, and every check they make happens before any collective.
"""

import fnmatch

import pytest
import torch

from ds_core.errors import ConfigError
from ds_parallel import TensorGroup, find_plan
from ds_parallel.apply import apply_plan, validate_plan
from ds_parallel.config import TensorParallelConfig
from ds_parallel.plan import hf_tp_plan
from ds_parallel.shards import GroupedQKV, KVHeads, Part, VocabPart

from ._models import gpt, hf_model


def _kinds(plan):
    return {n: s.kind for n, s in plan.styles.items()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_structure_agrees_with_the_models_own_tp_plan(family):
    model = hf_model(family)
    plan = find_plan(model, use_hf_plan=False)
    own = hf_tp_plan(model)
    assert own, f"{family} carries a tp_plan"
    want = {"colwise": "colwise", "rowwise": "rowwise", "colwise_gather_output": "colwise",
            "replicated_with_grad_allreduce": "partial_grad", "embedding_rowwise": "vocab_embedding"}
    names = [n for n, _ in model.named_modules()]
    for pattern, style in own.items():
        for n in [n for n in names if fnmatch.fnmatchcase(n, pattern)]:
            assert plan.styles[n].kind == want[style], (n, style, plan.styles[n])


def test_llama_heads_and_gqa_parts():
    plan = find_plan(hf_model("llama"))
    q = plan.styles["model.layers.0.self_attn.q_proj"]
    k = plan.styles["model.layers.0.self_attn.k_proj"]
    o = plan.styles["model.layers.0.self_attn.o_proj"]
    assert q.parts == (Part(48, 8, q.parts[0].name),)  # 6 heads of 8: whole heads per rank
    assert isinstance(k.parts[0], KVHeads) and k.parts[0].num_kv_heads == 2
    assert o.kind == "rowwise" and o.unit == 8
    assert plan.attention["model.layers.0.self_attn"].num_kv_heads == 2
    assert plan.styles["model.embed_tokens"].kind == "vocab_embedding"
    head = plan.styles["lm_head"]
    assert head.gather_output and isinstance(head.parts[0], VocabPart)


def test_phi3_fused_projections_split_per_part_not_gathered():
    plan = find_plan(hf_model("phi3"))
    qkv = plan.styles["model.layers.0.self_attn.qkv_proj"]
    assert [type(p) for p in qkv.parts] == [Part, KVHeads, KVHeads] and not qkv.gather_output
    assert not plan.styles["model.layers.0.self_attn.o_proj"].split_input
    gate_up = plan.styles["model.layers.0.mlp.gate_up_proj"]
    assert [p.size for p in gate_up.parts] == [64, 64]


def test_gpt2_conv1d_and_fused_c_attn():
    plan = find_plan(hf_model("gpt2"))
    c_attn = plan.styles["transformer.h.0.attn.c_attn"]
    assert [p.size for p in c_attn.parts] == [48, 48, 48]
    assert plan.styles["transformer.h.0.attn.c_proj"].kind == "rowwise"
    assert plan.styles["transformer.h.0.mlp.c_fc"].kind == "colwise"
    assert plan.styles["transformer.h.0.mlp.c_proj"].kind == "rowwise"
    assert plan.styles["transformer.wte"].kind == "vocab_embedding"


def test_falcon_and_bloom_fused_layouts():
    mqa = find_plan(hf_model("falcon")).styles["transformer.h.0.self_attention.query_key_value"]
    assert [type(p) for p in mqa.parts] == [Part, KVHeads, KVHeads] and mqa.parts[1].num_kv_heads == 1
    grouped = find_plan(hf_model("falcon_new")).styles["transformer.h.0.self_attention.query_key_value"]
    assert isinstance(grouped.parts[0], GroupedQKV)
    bloom = find_plan(hf_model("bloom")).styles["transformer.h.0.self_attention.query_key_value"]
    assert bloom.parts == (Part(144, 36, bloom.parts[0].name),)  # [heads][q, k, v][12]: whole heads
    assert find_plan(hf_model("bloom")).attention["transformer.h.0.self_attention"].alibi


def test_plain_module_plan_from_names_and_shapes():
    plan = find_plan(gpt())
    assert [p.size for p in plan.styles["blocks.0.qkv"].parts] == [32, 32, 32]
    assert plan.styles["blocks.0.proj"].kind == "rowwise"
    assert plan.styles["blocks.0.mlp.up"].kind == "colwise"
    assert plan.styles["blocks.0.mlp.down"].kind == "rowwise"
    assert plan.styles["tok"].kind == "vocab_embedding" and plan.styles["head"].kind == "colwise"
    assert "pos" not in plan.styles


def test_qwen3_head_norms_sum_their_gradient():
    plan = find_plan(hf_model("qwen3"))
    assert plan.styles["model.layers.0.self_attn.q_norm"].kind == "partial_grad"


def test_overrides_by_pattern():
    model = hf_model("llama")
    plan = find_plan(model, {"model.layers.*.mlp.down_proj": "replicate", "up_proj": "replicate",
                             "gate_proj": "replicate"})
    assert "model.layers.1.mlp.down_proj" not in plan.styles
    assert plan.sources["model.layers.0.mlp.up_proj"] == "override" or "model.layers.0.mlp.up_proj" not in plan.styles
    plan = find_plan(model, {"lm_head": "colwise"})  # keep the logits split over the vocabulary
    assert not plan.styles["lm_head"].gather_output


def test_override_naming_no_module_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'model.layers.\*.mlp.dwn_proj' names no module .*did you mean"):
        find_plan(hf_model("llama"), {"model.layers.*.mlp.dwn_proj": "rowwise"})
    with pytest.raises(ConfigError, match=r"style 'rowise' is not known \(did you mean 'rowwise'\?\)"):
        find_plan(hf_model("llama"), {"lm_head": "rowise"})


def test_plan_naming_a_missing_module_is_an_error_before_any_change():
    model = hf_model("llama")
    plan = find_plan(model)
    plan.styles["model.layers.7.mlp.down_proj"] = plan.styles["model.layers.0.mlp.down_proj"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match="names module 'model.layers.7.mlp.down_proj', which LlamaForCausalLM "
                                          "does not have"):
        apply_plan(model, plan, TensorGroup(size=2, rank=0))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing changed


def test_tp_not_dividing_the_heads_is_an_error_naming_the_numbers():
    model = hf_model("llama")  # 6 heads, 2 KV heads
    with pytest.raises(ConfigError, match="6 query heads cannot be split over tensor-parallel size 4"):
        validate_plan(model, find_plan(model), 4)
    # 3 divides the 6 heads (the 2 KV heads would be replicated) but not the MLP's 64 hidden units
    with pytest.raises(ConfigError, match="gate_proj of size 64 cannot be split evenly over tensor-parallel size 3"):
        validate_plan(model, find_plan(model), 3)


def test_deepspeed_partition_config_translates_to_overrides():
    cfg = TensorParallelConfig.model_validate({
        "autotp_size": 2,
        "partition_config": {"use_default_specs": False, "layer_specs": [
            {"patterns": [r".*\.down_proj\.weight$"], "partition_type": "row"},
            {"patterns": [r".*\.(gate|up)_proj\.weight$"], "partition_type": "column"}]}})
    model = hf_model("llama")
    overrides, keep = cfg.overrides_for([n for n, _ in model.named_modules() if n])
    plan = find_plan(model, overrides, keep_found=keep)
    assert set(_kinds(plan).values()) == {"colwise", "rowwise"}
    assert all(".mlp." in n for n in plan.styles) and not plan.attention
    bad = TensorParallelConfig.model_validate({"partition_config": {"layer_specs": [
        {"patterns": [r".*\.dense_4h\.weight$"], "partition_type": "row"}]}})
    with pytest.raises(ConfigError, match="matches no parameter"):
        bad.overrides_for([n for n, _ in model.named_modules() if n])


def test_offline_shards_hold_their_rows():
    model = hf_model("llama_kv3")
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard = apply_plan(model, find_plan(model), TensorGroup(size=2, rank=1))
    q = shard.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"][24:])
    k = shard.get_submodule("model.layers.0.self_attn.k_proj")
    assert k.weight.ds_tp.replicated and torch.equal(k.weight, full["model.layers.0.self_attn.k_proj.weight"])
    attn = shard.get_submodule("model.layers.0.self_attn")
    assert attn.num_key_value_groups == 1  # 3 heads per rank, KV heads 1,2,2 of lcm(3, 2) = 6 copies
