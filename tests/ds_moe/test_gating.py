"""Routing and the layer on one process: dense parity, hand-computed top-2, aux loss, capacity, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import ConfigError
from ds_moe import MoE, capacity, is_moe_param, route, split_params_into_different_moe_groups_for_optimizer


def mlp(d=8, h=16):
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))


def test_one_expert_equals_the_dense_expert():
    torch.manual_seed(0)
    dense = mlp()
    moe = MoE(8, dense, num_experts=1, k=1, capacity_factor=100.0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, l_aux, counts = moe(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = dense(ref_x)
    assert torch.equal(y, ref)  # one expert: softmax weight is exactly 1
    assert counts.tolist() == [15] and float(l_aux.detach()) == 1.0
    y.sum().backward()
    ref.sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-6)
    assert torch.allclose(moe.experts.experts["0"][0].weight.grad, dense[0].weight.grad, atol=1e-6)


def test_top2_against_a_hand_computed_example():
    # 3 tokens, 3 experts; logits chosen so the ranking is obvious
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    r = route(logits, k=2, capacity_factor=10.0, min_capacity=0, use_rts=False)
    p = F.softmax(logits, dim=-1)
    expected = {  # token -> {expert: renormalised weight}
        0: {0: p[0, 0] / (p[0, 0] + p[0, 1]), 1: p[0, 1] / (p[0, 0] + p[0, 1])},
        1: {1: p[1, 1] / (p[1, 1] + p[1, 2]), 2: p[1, 2] / (p[1, 1] + p[1, 2])},
        2: {2: p[2, 2] / (p[2, 2] + p[2, 0]), 0: p[2, 0] / (p[2, 2] + p[2, 0])},
    }
    got = {}
    for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist()):
        got.setdefault(t, {})[e] = w
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t].keys() == expected[t].keys()
        for e in expected[t]:
            assert abs(got[t][e] - float(expected[t][e])) < 1e-6
    assert r.expert.tolist() == sorted(r.expert.tolist())  # grouped by expert for dispatch
    assert r.exp_counts.tolist() == [2, 2, 2] and r.dropped == 0


def test_aux_loss_is_the_switch_formula():
    torch.manual_seed(1)
    logits = torch.randn(40, 4)
    r = route(logits, k=1, capacity_factor=1.0, min_capacity=4)
    p = F.softmax(logits, dim=-1)
    f = torch.bincount(logits.argmax(-1), minlength=4).float() / 40
    assert torch.allclose(r.l_aux, 4 * (f * p.mean(0)).sum())
    uniform = route(torch.zeros(8, 4).scatter(1, torch.arange(8)[:, None] % 4, 1.0) * 0 +
                    torch.eye(4).repeat(2, 1) * 1e-3, k=1, capacity_factor=1.0, min_capacity=0)
    assert abs(float(uniform.l_aux) - 1.0) < 1e-3  # balanced routing gives 1


@pytest.mark.parametrize("use_rts", [False, True])
def test_tokens_beyond_capacity_are_dropped(use_rts):
    logits = torch.zeros(20, 4)
    logits[:, 2] = 5.0  # every token wants expert 2
    cap = capacity(20, 4, 1.0, 2)
    assert cap == 5
    r = route(logits, k=1, capacity_factor=1.0, min_capacity=2, use_rts=use_rts)
    assert r.counts.tolist() == [0, 0, cap, 0] and r.dropped == 20 - cap
    assert r.exp_counts.tolist() == [0, 0, 20, 0]
    if not use_rts:
        assert sorted(r.token.tolist()) == list(range(cap))  # first come, first served
    assert capacity(20, 4, 1.0, 9) == 9  # min_capacity wins
    assert capacity(20, 4, 1.5, 0, k=2) == math.ceil(2 * 5 * 1.5)
    dropless = route(logits, k=1, capacity_factor=1.0, min_capacity=2, drop_tokens=False)
    assert dropless.dropped == 0 and dropless.counts.tolist() == [0, 0, 20, 0] and dropless.capacity is None


def test_layer_outputs_zero_for_dropped_tokens_and_noise_policies_run():
    torch.manual_seed(2)
    moe = MoE(8, mlp(), num_experts=4, k=1, capacity_factor=0.5, min_capacity=1, use_rts=False)
    x = torch.randn(16, 8)
    y, _, counts = moe(x)
    kept = set(moe.last_routing.token.tolist())
    for t in range(16):
        assert (t in kept) == bool(y[t].abs().sum() > 0)
    assert int(counts.sum()) == 16 and moe.last_routing.dropped == 16 - len(kept)
    for policy in ("Jitter", "RSample"):
        noisy = MoE(8, mlp(), num_experts=4, k=2, noisy_gate_policy=policy)
        out, l_aux, _ = noisy(x)
        (out.sum() + l_aux).backward()


def test_residual_moe_mixes_a_dense_mlp():
    torch.manual_seed(3)
    moe = MoE(8, mlp(), num_experts=2, k=1, use_residual=True, capacity_factor=100.0)
    x = torch.randn(6, 8)
    y, _, _ = moe(x)
    with torch.no_grad():
        coef = torch.softmax(moe.coefficient(x), -1)
        r = moe.last_routing
        moe_out = torch.zeros_like(x)
        for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight):
            moe_out[t] += w * moe.experts.experts[str(e)](x[t])
        assert torch.allclose(y, moe_out * coef[:, :1] + moe.mlp(x) * coef[:, 1:], atol=1e-6)


def test_param_groups_split_experts_out():
    moe = MoE(8, mlp(), num_experts=2)
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(moe.parameters()), "name": "g", "weight_decay": 0.1}])
    assert [g.get("moe", False) for g in groups] == [False, True]
    assert groups[1]["name"] == "g_ep_size_1" and groups[1]["weight_decay"] == 0.1
    assert all(is_moe_param(p) for p in groups[1]["params"]) and len(groups[1]["params"]) == 8
    assert groups[0]["params"] == [moe.gate.wg.weight]
    assert len(split_params_into_different_moe_groups_for_optimizer(moe)) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 3, "ep_size": 2}, "num_experts 3 is not divisible by ep_size 2"),
    ({"num_experts": 2, "k": 3}, r"k=3 must be an integer in \[1, num_experts=2\]"),
    ({"num_experts": 2, "capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
    ({"num_experts": 2, "eval_capacity_factor": -1.0}, "eval_capacity_factor=-1.0 must be > 0"),
    ({"num_experts": 2, "noisy_gate_policy": "Gaussian"}, "noisy_gate_policy='Gaussian' is not one of"),
    ({"num_experts": 2, "enable_expert_tensor_parallelism": True}, "enable_expert_tensor_parallelism=True"),
    ({"num_experts": 4, "ep_size": 2}, "ep_size=2 needs a process group|ep_size 2 does not divide the world size 1"),
])
def test_bad_arguments_fail_clearly(kwargs, match):
    # without a process group, or in a one-process world left by an earlier test: both refuse ep_size 2
    with pytest.raises(ConfigError, match=match):
        MoE(8, mlp(), **kwargs)


def test_wrong_hidden_size_fails_clearly():
    moe = MoE(8, mlp(), num_experts=2)
    with pytest.raises(ConfigError, match="last dimension 5, the layer was built with hidden_size=8"):
        moe(torch.randn(2, 5))
