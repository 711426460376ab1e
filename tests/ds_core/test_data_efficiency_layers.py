"""Progressive layer drop and random-LTD: schedules against their formulas, layers really skipped, tokens
really dropped and scattered back, parity with plain training when nothing is dropped, and the same random
choice on every data-parallel rank."""

import copy
import math

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.data_efficiency import LayerDrop, RandomLTD, layer_drop, pld_theta
from ds_core.errors import ConfigError
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

TINY = GPTConfig(vocab_size=64, seq_len=32, dim=32, layers=4, heads=2)


def _config(**sections):
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0, "seed": 5,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, **sections}


def _ltd(layers=(1, 2), lo=8, hi=32, require_steps=6, seq_per_step=8, **extra):
    return {"enabled": True, "seed": 11, "data_routing": {"enabled": True, "random_ltd": {
        "enabled": True, "total_layer_num": TINY.layers, "random_ltd_layer_num": len(layers),
        "random_ltd_layer_id": list(layers), "model_mask_name": "attention_mask", "model_type": "decoder",
        "hidden_state_order": "batch_seq_dim", "random_ltd_schedule": {
            "min_value": lo, "max_value": hi, "schedule_type": "fixed_linear",
            "schedule_config": {"require_steps": require_steps, "seq_per_step": seq_per_step}}, **extra}}}


def _count_calls(model):
    """Counts of each block's real computation (its first LayerNorm runs only when the block does)."""
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.ln1.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


# -- progressive layer drop ----------------------------------------------------------------------------------
def test_pld_theta_follows_its_formula():
    for t in (0, 1, 10, 100, 1000, 10_000):
        assert pld_theta(t, 0.5, 0.001) == pytest.approx((1 - 0.5) * math.exp(-0.001 * t) + 0.5, rel=1e-12)
    assert pld_theta(0, 0.3, 0.1) == 1.0  # every layer is kept at the start


def test_pld_skipped_layers_really_skip_and_deeper_layers_skip_more():
    torch.manual_seed(0)
    model = GPT(TINY).train()
    calls = _count_calls(model)
    drop = layer_drop(model, seed=3)
    x, _ = synthetic_tokens(1, 4, 64, 0)
    drop.begin_forward(1.0)  # as the engine's step 0 (theta(0) = 1): every block runs and shows its output
    model(x)
    calls[:] = drop.calls[:] = [0] * TINY.layers
    runs = 100
    for _ in range(runs):
        drop.begin_forward(0.2)
        model(x)
    assert calls == drop.calls  # a block counted as skipped did not compute
    assert all(c < runs for c in calls[1:])
    for i, c in enumerate(calls):  # kept with p_l = 1 - (l / L)(1 - theta)
        p = 1 - (i + 1) / TINY.layers * 0.8
        assert abs(c / runs - p) < 0.18, (i, c, p)
    assert calls[0] > calls[-1]


def test_pld_skipped_block_is_the_identity_and_kept_block_is_scaled():
    torch.manual_seed(0)
    model = GPT(TINY).train()
    reference = copy.deepcopy(model)
    drop = LayerDrop(model.blocks, seed=1)
    x = torch.randn(2, 8, TINY.dim)
    drop.begin_forward(0.0)  # the last block's keep probability is 1 - 1 * 1 = 0: always skipped
    assert torch.equal(model.blocks[3](x), x)
    p = drop.keep_probability(0)
    assert p == pytest.approx(0.75)
    outs = []
    for _ in range(20):  # the draw is per forward: begin_forward starts the next one
        drop.begin_forward(0.0)
        got = model.blocks[0](x)
        outs.append(torch.equal(got, x))
        if not outs[-1]:
            torch.testing.assert_close(got, x + (reference.blocks[0](x) - x) / p)  # residual branch / p_l
    assert set(outs) == {True, False}  # sometimes skipped, sometimes run
    model.eval()
    assert torch.equal(model.blocks[3](x), reference.blocks[3](x))  # evaluation runs every block


class ThetaGPT(GPT):
    """DeepSpeed's contract: the model's forward takes progressive_layer_drop and pld_theta."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.thetas = []

    def forward(self, tokens, targets=None, progressive_layer_drop=False, pld_theta=1.0):
        self.thetas.append((progressive_layer_drop, pld_theta))
        return super().forward(tokens, targets)


def test_pld_model_taking_pld_theta_receives_the_schedule():
    model = ThetaGPT(TINY)
    engine, *_ = ds_core.initialize(model=model, config=_config(
        train_batch_size=2, progressive_layer_drop={"enabled": True, "theta": 0.5, "gamma": 0.1}))
    for step in range(4):
        engine.backward(engine(*synthetic_tokens(2, 16, 64, step)))
        assert engine.get_pld_theta() == pytest.approx(pld_theta(step, 0.5, 0.1))
        engine.step()
    assert model.thetas == [(True, pytest.approx(pld_theta(t, 0.5, 0.1))) for t in range(4)]


def _train(config, steps, rank, model_seed=0):
    torch.manual_seed(model_seed)
    engine, *_ = ds_core.initialize(model=GPT(TINY), config=config)
    calls = _count_calls(engine.module)
    losses = []
    for step in range(steps):
        loss = engine(*synthetic_tokens(2, 32, 64, step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return engine, losses, calls


@pytest.mark.world_size(2)
def test_pld_two_ranks_same_choice_and_theta_one_equals_plain_training():
    rank = dist.get_rank()
    _, plain, _ = _train(_config(), 4, rank)
    _, kept_all, calls = _train(_config(progressive_layer_drop={"enabled": True, "theta": 1.0, "gamma": 0.5}), 4,
                                rank)
    assert kept_all == plain  # theta = 1: nothing dropped, bit for bit the plain run
    assert calls == [4] * TINY.layers
    engine, losses, calls = _train(_config(progressive_layer_drop={"enabled": True, "theta": 0.3, "gamma": 1.0}),
                                   8, rank)
    assert sum(calls) < 8 * TINY.layers  # some layers were skipped
    everyone = [None, None]
    dist.all_gather_object(everyone, calls)
    assert everyone[0] == everyone[1]  # the same layers skipped on both ranks
    w = engine.module.blocks[3].qkv.weight.detach().clone()
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    assert torch.equal(both[0], both[1])


def test_pld_on_a_model_without_blocks_is_refused():
    with pytest.raises(ConfigError, match="has no stack of transformer blocks"):
        ds_core.initialize(model=torch.nn.Linear(4, 4), config=_config(
            train_batch_size=2, progressive_layer_drop={"enabled": True, "theta": 0.5}))


# -- random-LTD -------------------------------------------------------------------------------------------
def test_random_ltd_with_every_token_kept_equals_the_plain_model_exactly():
    torch.manual_seed(0)
    model = GPT(TINY).train()
    plain = copy.deepcopy(model)
    ltd = RandomLTD(model.blocks, [0, 1, 2, 3], seed=4)
    x, y = synthetic_tokens(2, 32, 64, 0)
    ltd.begin_forward(32)
    assert torch.equal(model(x, y), plain(x, y))
    ltd.begin_forward(100)  # more than the sequence: everything kept
    assert torch.equal(model(x), plain(x))


def test_random_ltd_drops_tokens_past_the_block_and_scatters_them_back_in_order():
    torch.manual_seed(0)
    model = GPT(TINY).train()
    plain = copy.deepcopy(model)
    ltd = RandomLTD(model.blocks, [1], seed=4)
    x = torch.randn(3, 32, TINY.dim)
    ltd.begin_forward(8)
    idx = ltd.indices(1, 3, 32, 8, x.device)
    out = model.blocks[1](x)
    assert ltd.last_kept[1] == 8
    assert idx.shape == (3, 8) and bool((idx[:, 1:] > idx[:, :-1]).all())  # sorted: causal order kept
    keep = torch.zeros(3, 32, dtype=torch.bool)
    keep.scatter_(1, idx, True)
    assert torch.equal(out[~keep], x[~keep])  # dropped tokens bypass the block unchanged
    sub = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, TINY.dim))
    torch.testing.assert_close(out.gather(1, idx.unsqueeze(-1).expand(-1, -1, TINY.dim)), plain.blocks[1](sub),
                               rtol=0, atol=0)


def test_random_ltd_seq_batch_order_and_mask_are_cut_alike():
    seen = {}

    class Block(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen["x"], seen["mask"] = x.shape, attention_mask.shape
            return x * 2

    blocks = torch.nn.ModuleList([Block(), Block()])
    ltd = RandomLTD(blocks, [0], seed=1, seq_dim=0, mask_name="attention_mask")
    ltd.begin_forward(4)
    x = torch.randn(10, 2, 6)  # (seq, batch, hidden)
    mask = torch.ones(2, 1, 10, 10)
    out = blocks[0](x, attention_mask=mask)
    assert seen == {"x": (4, 2, 6), "mask": (2, 1, 4, 4)}
    assert int((out != x).any(-1).sum()) == 8  # 4 tokens of each of 2 sequences were doubled


def test_random_ltd_layer_ids_outside_the_model_are_refused():
    with pytest.raises(ConfigError, match=r"random_ltd_layer_id \[7\] outside the model's 4 layers"):
        ds_core.initialize(model=GPT(TINY), config=_config(train_batch_size=2, data_efficiency=_ltd(layers=(1, 7))))


@pytest.mark.world_size(2)
def test_random_ltd_two_ranks_keep_the_scheduled_count_and_the_same_tokens():
    rank = dist.get_rank()
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=GPT(TINY), config=_config(data_efficiency=_ltd()))
    ltd = engine.data_efficiency.random_ltd
    drawn = []
    original = ltd.indices
    ltd.indices = lambda *a: drawn.append(original(*a)) or drawn[-1]
    kept = []
    for step in range(8):
        engine.backward(engine(*synthetic_tokens(2, 32, 64, step, rank)))
        engine.step()
        formula = min(32, (math.floor(step / 6 * 24 + 8) // 8) * 8)
        assert ltd.last_kept == {1: formula, 2: formula}, step
        kept.append(formula)
    assert kept == [8, 8, 16, 16, 24, 24, 32, 32]
    assert len(drawn) == 2 * 6  # two layers drop tokens in the 6 steps with fewer than 32 kept
    everyone = [None, None]
    dist.all_gather_object(everyone, [d.tolist() for d in drawn])
    assert everyone[0] == everyone[1]
    w = engine.module.blocks[1].qkv.weight.detach().clone()
    both = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(both, w)
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pld_on_hugging_face_blocks_keeps_every_layer_at_theta_one_and_skips_below(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=64, bos_token_id=0, eos_token_id=0))
    model.train()
    plain = copy.deepcopy(model)
    drop = layer_drop(model, seed=1)
    x = torch.randint(0, 64, (2, 16))
    drop.begin_forward(1.0)
    assert torch.equal(model(x).logits, plain(x).logits)  # nothing dropped: the plain model exactly
    for _ in range(6):
        drop.begin_forward(0.2)
        model(x, labels=x).loss.backward()
    assert drop.calls[0] > drop.calls[-1] and sum(drop.calls) < 4 + 6 * 4
