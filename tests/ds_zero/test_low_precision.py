"""Low-precision training state under ZeRO 1 and 2 (docs/precision.md), 2 gloo ranks.

References and tolerances: each stage with bf16 masters, gradients and optimizer state ends within 1e-2
of the same stage with fp32 masters after 12 steps (per-step loss; bf16 state and rounding noise); a
resumed stage-2 run (fresh model, load, two more steps) equals the uninterrupted one bit for bit.
"""

import pytest
import torch

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
    _, engine = engine_losses(make_model(), 3, stage=2, bf16=LOW)
    engine.save_checkpoint(tmp_path)
    expected = train(engine, 2, first_step=3)
    _, fresh = engine_losses(make_model(1), 0, stage=2, bf16=LOW)
    fresh.load_checkpoint(tmp_path)
    assert train(fresh, 2, first_step=3) == expected
    assert all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), fresh.module.parameters()))
