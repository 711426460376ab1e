"""The engine against plain PyTorch DDP on the same model, seed and data (2 gloo ranks).

Tolerances: fp32 losses equal to 1e-5 (absolute) for 20 steps; gradient accumulation (micro 4 × 2)
equals micro 8 × 1 to 1e-5; bf16 (fp32 master weights) stays within 2e-2 of the fp32 DDP loss and fp16
(dynamic loss scaling) within 1e-2 over 10 steps.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
LR, CLIP = 3e-3, 1.0


def _config(**over):
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "gradient_clipping": CLIP, "steps_per_print": 0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}}}
    base.update(over)
    return base


def _ddp_losses(model, steps, micro, accumulation=1):
    rank = dist.get_rank()
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(accumulation):
            x, y = synthetic_tokens(micro, CFG.seq_len, CFG.vocab_size, step * accumulation + m, rank)
            loss = ddp(x, y)
            (loss / accumulation).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total / accumulation)
    return losses


def _engine_losses(model, steps, micro, accumulation=1, **config):
    rank = dist.get_rank()
    engine, *_ = ds_core.initialize(model=model, config=_config(
        train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accumulation, **config))
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(accumulation):
            x, y = synthetic_tokens(micro, CFG.seq_len, CFG.vocab_size, step * accumulation + m, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / accumulation)
    return losses, engine


@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_fp32_matches_ddp_20_steps():
    torch.manual_seed(0)
    model = GPT(CFG)
    ref = _ddp_losses(copy.deepcopy(model), 20, 4)
    ours, engine = _engine_losses(model, 20, 4)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5, (ours, ref)
    assert engine.global_steps == 20 and engine.global_samples == 20 * 4 * 2
    assert engine.get_global_grad_norm() > 0


@pytest.mark.world_size(2)
def test_gradient_accumulation_equals_larger_micro_batch():
    """micro 4 × 2 accumulation steps == micro 8 × 1 on the same samples."""
    torch.manual_seed(0)
    model = GPT(CFG)
    rank = dist.get_rank()
    big, _ = _engine_losses(copy.deepcopy(model), 5, 8)
    engine, *_ = ds_core.initialize(model=model, config=_config(train_micro_batch_size_per_gpu=4,
                                                                gradient_accumulation_steps=2))
    small = []
    for step in range(5):
        x, y = synthetic_tokens(8, CFG.seq_len, CFG.vocab_size, step, rank)
        total = 0.0
        for half in (slice(0, 4), slice(4, 8)):
            loss = engine(x[half], y[half])
            engine.backward(loss)
            engine.step()
            total += loss.item()
        small.append(total / 2)
    assert max(abs(a - b) for a, b in zip(small, big)) < 1e-5, (small, big)
    assert engine.global_steps == 5 and engine.micro_steps == 10


@pytest.mark.world_size(2)
def test_bf16_close_to_fp32_ddp():
    torch.manual_seed(0)
    model = GPT(CFG)
    ref = _ddp_losses(copy.deepcopy(model), 10, 4)
    ours, engine = _engine_losses(model, 10, 4, bf16={"enabled": True})
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert engine.optimizer.flat_master.dtype == torch.float32
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 2e-2, (ours, ref)


@pytest.mark.world_size(2)
def test_fp16_dynamic_loss_scale_close_to_fp32_ddp():
    torch.manual_seed(0)
    model = GPT(CFG)
    ref = _ddp_losses(copy.deepcopy(model), 10, 4)
    ours, engine = _engine_losses(model, 10, 4, fp16={"enabled": True, "initial_scale_power": 8})
    assert next(engine.module.parameters()).dtype == torch.float16
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-2, (ours, ref)
    assert engine.get_loss_scale() >= 1.0


@pytest.mark.world_size(2)
def test_fp16_overflow_skips_step_on_every_rank():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1}})
    before = [p.detach().clone() for p in engine.module.parameters()]
    # only rank 1 overflows; both ranks must skip
    x = torch.full((2, 4), 6e4 if dist.get_rank() == 1 else 1.0)
    loss = engine(x).float().sum()
    engine.backward(loss)
    engine.step()
    assert engine.skipped_steps == 1
    assert engine.get_loss_scale() == 8.0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


@pytest.mark.world_size(2)
def test_no_sync_defers_reduction():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 0,
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}}})
    x = torch.ones(1, 3) * (dist.get_rank() + 1)
    with engine.no_sync():
        engine.backward(engine(x).sum())
    local = engine.module.weight.grad.clone()
    assert torch.equal(local, x)  # not averaged
    engine.zero_grad()
    engine.backward(engine(x).sum())
    assert torch.allclose(engine.module.weight.grad, torch.full((1, 3), 1.5))


def test_nan_loss_names_the_step():
    model = torch.nn.Linear(2, 1)
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    engine.backward(engine(torch.ones(1, 2)).sum())
    engine.step()
    with pytest.raises(ds_core.engine.NonFiniteLossError, match="loss is nan at optimizer step 1"):
        engine.backward(engine(torch.full((1, 2), float("nan"))).sum())


@pytest.mark.world_size(2)
def test_bf16_communication_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(CFG)
    ref, _ = _engine_losses(copy.deepcopy(model), 5, 4)
    ours, engine = _engine_losses(model, 5, 4, communication_data_type="bf16")
    assert engine.reducer.comm_dtype == torch.bfloat16
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-2, (ours, ref)


@pytest.mark.world_size(2)
def test_prescale_and_predivide_match_plain_average():
    torch.manual_seed(0)
    model = GPT(CFG)
    ref, _ = _engine_losses(copy.deepcopy(model), 5, 4)
    ours, _ = _engine_losses(model, 5, 4, prescale_gradients=True, gradient_predivide_factor=4.0)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5, (ours, ref)


def test_client_optimizer_rebuilt_over_bf16_masters():
    model = torch.nn.Linear(4, 2)
    client = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    engine, opt, *_ = ds_core.initialize(model=model, optimizer=client, config={
        "train_micro_batch_size_per_gpu": 1, "steps_per_print": 0, "bf16": {"enabled": True}})
    inner = opt.optimizer
    assert type(inner) is torch.optim.AdamW and inner is not client
    assert inner.param_groups[0]["weight_decay"] == 0.05
    assert all(p.dtype == torch.float32 for p in inner.param_groups[0]["params"])
    engine.backward(engine(torch.ones(1, 4)).float().sum())
    engine.step()
