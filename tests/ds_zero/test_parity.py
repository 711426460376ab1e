"""ZeRO stages 1 and 2 against plain PyTorch DDP and the engine's stage 0 (2 gloo ranks, tiny GPT).

Tolerances: fp32 losses equal to DDP's to 1e-5 (absolute) for 20 steps, and with gradient
accumulation (2 micro-steps) for 8 steps; bf16 (fp32 masters) within 2e-2 of fp32 DDP and fp16
(dynamic loss scale) within 1e-2 over 10 steps; CPU offload (this machine has no accelerator, so
the offload path runs host-to-host) equal to DDP to 1e-5.
"""

import copy

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.optim.fused import fuses
from ds_zero.reduce import AllReduceGradients, PartitionedGradientReducer

from ._train import CLIP, LR, WD, batch, config, ddp_losses, engine_losses, make_model, max_diff, train


@pytest.mark.world_size(2)
def test_stages_1_and_2_match_ddp_and_stage_0_fp32():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 20)
    stage0, _ = engine_losses(copy.deepcopy(model), 20, stage=0)
    s1, e1 = engine_losses(copy.deepcopy(model), 20, stage=1)
    s2, e2 = engine_losses(copy.deepcopy(model), 20, zero_optimization={
        "stage": 2, "reduce_bucket_size": 3000, "allgather_bucket_size": 1000, "overlap_comm": True})
    assert isinstance(e1.reducer, AllReduceGradients) and isinstance(e2.reducer, PartitionedGradientReducer)
    for ours in (stage0, s1, s2):
        assert max_diff(ours, ref) < 1e-5, (ours, ref)
    assert max_diff(s2, stage0) < 1e-5
    # each rank holds half of the optimizer state; the model stays replicated
    numel = sum(p.numel() for p in model.parameters())
    assert e2.optimizer.masters[0].numel() == -(-numel // 2)
    other = [torch.empty_like(p) for p in (e2.module.tok.weight,) * 2]
    dist.all_gather(other, e2.module.tok.weight.detach())
    assert torch.equal(other[0], other[1])
    assert e2.get_global_grad_norm() > 0 and e2.global_steps == 20


@pytest.mark.world_size(2)
def test_gradient_accumulation_and_reduce_variants_match_ddp():
    import ds_zero.partition
    import ds_zero.reduce

    # this process only: also exercise the per-owner reduce and the (chunked) all-gather used off gloo
    ds_zero.reduce.GLOO_PREFERS_ALL_REDUCE = False
    ds_zero.partition.GLOO_GATHER_BY_SUM = False
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 8, accumulation=2)
    for zero in ({"stage": 1}, {"stage": 2, "reduce_bucket_size": 2000, "allgather_bucket_size": 1000},
                 {"stage": 2, "reduce_bucket_size": 2000, "reduce_scatter": False, "overlap_comm": True}):
        ours, engine = engine_losses(copy.deepcopy(model), 8, accumulation=2, zero_optimization=zero)
        assert max_diff(ours, ref) < 1e-5, (zero, ours, ref)
        if zero["stage"] == 2:
            assert engine.reducer.reduce_scatter == zero.get("reduce_scatter", True)
        assert engine.micro_steps == 16


@pytest.mark.smoke
@pytest.mark.world_size(2)
def test_cpu_offload_matches_ddp():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 20)
    for stage in (1, 2):
        ours, engine = engine_losses(copy.deepcopy(model), 20, zero_optimization={
            "stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}})
        assert max_diff(ours, ref) < 1e-5, (stage, ours, ref)
        opt = engine.optimizer
        assert opt.offload and all(m.device.type == "cpu" for m in opt.masters)
        assert not opt.aliased  # separate host masters, copied back into the model after each step


@pytest.mark.world_size(2)
def test_bf16_and_fp16_close_to_fp32_ddp():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 10)
    for stage in (1, 2):
        ours, engine = engine_losses(copy.deepcopy(model), 10, bf16={"enabled": True},
                                     zero_optimization={"stage": stage, "reduce_bucket_size": 3000})
        assert next(engine.module.parameters()).dtype == torch.bfloat16
        assert engine.optimizer.masters[0].dtype == torch.float32
        if fuses(engine.optimizer.optimizer, "grad_scale", "copy_to"):  # ds-ops installed: one fused pass
            assert all(t is not None for (t,) in engine.optimizer.zero._copy_targets())
        assert max_diff(ours, ref) < 2e-2, (stage, ours, ref)
    ours, engine = engine_losses(copy.deepcopy(model), 10, fp16={"enabled": True, "initial_scale_power": 8},
                                 zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert max_diff(ours, ref) < 1e-2, (ours, ref)
    assert engine.get_loss_scale() >= 1.0


@pytest.mark.world_size(2)
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine, *_ = ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 2},
        "fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1}})
    before = [p.detach().clone() for p in engine.module.parameters()]
    x = torch.full((2, 4), 6e4 if dist.get_rank() == 1 else 1.0)  # only rank 1 overflows
    engine.backward(engine(x).float().sum())
    engine.step()
    assert engine.skipped_steps == 1 and engine.get_loss_scale() == 8.0
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    engine.backward(engine(torch.ones(2, 4)).float().sum())
    engine.step()
    assert engine.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return decay, no_decay


@pytest.mark.world_size(2)
def test_param_groups_frozen_params_client_optimizer_and_scheduler():
    """Per-group hyper-parameters survive partitioning; frozen parameters are left alone; a client
    optimizer's class and groups are kept; the scheduler drives the partition optimizer."""
    model = make_model()
    model.pos.weight.requires_grad_(False)
    ref_model = copy.deepcopy(model)

    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(ref_model)
    decay, no_decay = _groups(ref_model)
    opt = torch.optim.AdamW([{"params": [p for p in decay if p.requires_grad], "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0, "lr": LR / 3}], lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref = []
    for step in range(8):
        x, y = batch(4, step)
        loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        sched.step()
        ref.append(loss.item())

    frozen_before = model.pos.weight.detach().clone()
    decay, no_decay = _groups(model)
    client = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                {"params": no_decay, "weight_decay": 0.0, "lr": LR / 3}], lr=LR)
    engine, zopt, _, zsched = ds_core.initialize(
        model=model, optimizer=client,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        config={"train_micro_batch_size_per_gpu": 4, "gradient_clipping": CLIP, "steps_per_print": 0,
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 2500}})
    ours = train(engine, 8)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    assert [g["weight_decay"] for g in zopt.param_groups] == [0.1, 0.0]
    assert zsched.optimizer is zopt.optimizer
    assert engine.get_lr() == [g["lr"] for g in opt.param_groups]
    assert torch.equal(engine.module.pos.weight, frozen_before)
    assert sum(m.numel() for m in zopt.masters) < sum(p.numel() for p in model.parameters())


@pytest.mark.world_size(2)
def test_config_optimizers_and_scheduler():
    """Every optimizer the engine builds from the config runs partitioned and equals stage 0."""
    model = make_model()
    sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 3}}
    for opt in ({"type": "Adam", "params": {"lr": LR, "weight_decay": WD, "adam_w_mode": False}},
                {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
                {"type": "Adagrad", "params": {"lr": 0.01}},
                {"type": "Lion", "params": {"lr": 1e-4}}):
        ref, _ = engine_losses(copy.deepcopy(model), 4, stage=0, optimizer=opt, scheduler=sched)
        ours, engine = engine_losses(copy.deepcopy(model), 4, stage=2, optimizer=opt, scheduler=sched)
        assert max_diff(ours, ref) < 1e-5, (opt["type"], ours, ref)
        assert engine.lr_scheduler.optimizer is engine.optimizer.optimizer


def test_single_rank_stage_2_equals_stage_0():
    model = make_model()
    ref, _ = engine_losses(copy.deepcopy(model), 5, stage=0)
    ours, engine = engine_losses(copy.deepcopy(model), 5, stage=2)
    assert max_diff(ours, ref) < 1e-6
    assert config(stage=2)["zero_optimization"] == {"stage": 2}
