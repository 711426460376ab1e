"""Low-precision training state under ZeRO 1 and 2 (docs/precision.md), 2 gloo ranks (and 4).

References and tolerances: each stage with bf16 masters, gradients and optimizer state ends within 1e-2
of the same stage with fp32 masters after 12 steps (per-step loss; bf16 state and rounding noise); a
resumed stage-2 run (fresh model, load, two more steps) equals the uninterrupted one bit for bit; an
fp32-master checkpoint loads into a bf16-master run and back (same weights, then losses within 1e-2 of
the fp32-master run); fp16 masters train under ZeRO-2 with CPU offload (the loss falls over 8 steps).
"""

import pytest
import torch

from ds_core.engine import low_precision
from ds_core.engine.low_precision import ROUNDING_STEP_KEY

from ._train import engine_losses, make_model, max_diff, train

LOW = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


@pytest.mark.world_size(2)
def test_bf16_state_under_zero_1_and_2_trains_like_fp32_masters():
    for stage, offload in ((1, False), (2, False), (2, True)):
        zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
        ref, _ = engine_losses(make_model(), 12, stage=None, bf16={"enabled": True}, zero_optimization=zero)
        losses, engine = engine_losses(make_model(), 12, stage=None, bf16=LOW, zero_optimization=zero)
        assert max_diff(losses, ref) < 1e-2, (stage, offload)
        strategy = engine.strategy
        grads = strategy.reducer.grad_partitions() if not offload else strategy.zero.grads
        assert {g.dtype for g in grads} == {torch.bfloat16}
        assert {m.dtype for m in strategy.masters} == {torch.bfloat16}
        assert strategy.aliased is not offload  # on the device the masters are the model's own partition
        for state in strategy.optimizer.state.values():
            assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
        assert strategy.optimizer.param_groups[0][ROUNDING_STEP_KEY] == 12
        engine.destroy()


@pytest.mark.world_size(2)
def test_zero_2_resume_with_bf16_state_is_exact(tmp_path):
    """With partitions larger than a chunk, so they are stepped in slices (``CHUNK_NUMEL``)."""
    chunk = low_precision.CHUNK_NUMEL
    low_precision.CHUNK_NUMEL = 4096
    try:
        _, engine = engine_losses(make_model(), 3, stage=2, bf16=LOW)
        assert engine.strategy.masters[0].numel() > 4096
        engine.save_checkpoint(tmp_path)
        expected = train(engine, 2, first_step=3)
        _, fresh = engine_losses(make_model(1), 0, stage=2, bf16=LOW)
        fresh.load_checkpoint(tmp_path)
        assert train(fresh, 2, first_step=3) == expected
        assert all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), fresh.module.parameters()))
    finally:
        low_precision.CHUNK_NUMEL = chunk


@pytest.mark.world_size(2)
def test_zero_2_checkpoints_cross_between_fp32_and_bf16_masters(tmp_path):
    _, fp32m = engine_losses(make_model(), 2, stage=2, bf16={"enabled": True})
    fp32m.save_checkpoint(tmp_path / "fp32m")
    _, low = engine_losses(make_model(1), 0, stage=2, bf16=LOW)
    low.load_checkpoint(tmp_path / "fp32m")
    assert all(torch.equal(a, b) for a, b in zip(fp32m.module.parameters(), low.module.parameters()))
    assert {m.dtype for m in low.strategy.masters} == {torch.bfloat16}
    ref = train(fp32m, 2, first_step=2)
    assert max_diff(train(low, 2, first_step=2), ref) < 1e-2
    low.save_checkpoint(tmp_path / "low")
    _, back = engine_losses(make_model(1), 0, stage=2, bf16={"enabled": True})
    back.load_checkpoint(tmp_path / "low")
    assert {m.dtype for m in back.strategy.masters} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(low.module.parameters(), back.module.parameters()))
    train(back, 1, first_step=4)


@pytest.mark.world_size(2)
def test_fp16_masters_under_zero_2_cpu_offload():
    """DeepSpeed's one supported place for fp16_master_weights_and_grads: ZeRO-2 with CPU offload."""
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    fp16 = {"enabled": True, "fp16_master_weights_and_grads": True, "initial_scale_power": 8}
    losses, engine = engine_losses(make_model(), 8, stage=None, fp16=fp16, zero_optimization=zero)
    assert {m.dtype for m in engine.strategy.masters} == {torch.float16}
    assert {g.dtype for g in engine.strategy.zero.grads} == {torch.float16}
    assert losses[-1] < losses[0]


@pytest.mark.world_size(4)
def test_bf16_state_under_zero_2_on_four_ranks():
    """On 4 ranks (a quarter of the state per rank): within the same 1e-2 of fp32 masters after 12 steps,
    and the masters, gradients and moments each rank holds are bf16 and a quarter of the parameters."""
    ref, _ = engine_losses(make_model(), 12, stage=2, bf16={"enabled": True})
    losses, engine = engine_losses(make_model(), 12, stage=2, bf16=LOW)
    assert max_diff(losses, ref) < 1e-2
    strategy = engine.strategy
    numel = sum(p.numel() for p in engine.module.parameters())
    held = sum(m.numel() for m in strategy.masters)
    assert {m.dtype for m in strategy.masters} == {torch.bfloat16}
    assert {g.dtype for g in strategy.reducer.grad_partitions()} == {torch.bfloat16}
    assert numel / 4 <= held <= numel / 4 + 4 * 64  # a quarter, up to alignment padding
    engine.destroy()
