"""ZeRO stage 3 with every parameter partitioned (``stage3_param_persistence_threshold: 0``) on models
whose forward uses parameters outside the module that owns them, against PyTorch DDP.

Tolerance: fp32 losses equal to DDP's to 1e-5 (absolute) — the same arithmetic on gathered values; a
forward computing with a released parameter's placeholder would give NaN or a different loss at step 0.
Outside a forward or backward, a released parameter's values are not there: every use raises an error
naming the parameter (never a computation with a placeholder), on each rank that touches it.
"""

import copy
import io

import pytest
import torch
import torch.distributed as dist

from ._external import make
from ._train import config, ddp_losses, engine_losses, max_diff, train

ZERO = {"stage": 3, "stage3_param_persistence_threshold": 0}


def _stats(engine) -> dict:
    return engine.optimizer.parts.coordinator.prefetcher.stats


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", ["parent", "shared"])
def test_parameters_read_outside_their_module_match_ddp(kind):
    """``parent``: the root reads ``tok.weight`` (an output projection tied without a module) and applies
    ``mlp.down.weight`` without calling ``down``; ``shared``: ``enc.weight`` is used by ``enc`` and by a
    sibling module it is passed to."""
    model = make(kind)
    ref = ddp_losses(copy.deepcopy(model), 6)
    ours, engine = engine_losses(copy.deepcopy(model), 6, zero_optimization=ZERO)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    assert _stats(engine)["on_access"] > 0  # gathered where touched on the first step


@pytest.mark.world_size(2)
def test_multihead_attention_matches_ddp_and_released_parameters_fail_loudly():
    from ds_zero import GatheredParameters, ReleasedParameterError, ReleasedTensor, gathered_state_dict

    model = make("mha")
    ref = ddp_losses(copy.deepcopy(model), 6)
    ours, engine = engine_losses(copy.deepcopy(model), 6, zero_optimization=ZERO)
    assert all(torch.isfinite(torch.tensor(ours)))
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    coord = engine.optimizer.parts.coordinator
    # the first step registered out_proj's parameters with the attention module that reads them ...
    attn = coord.entries[id(engine.module.blocks[0].attn)]
    assert {s.name for s in attn.shards} >= {"blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight",
                                            "blocks.0.attn.out_proj.bias"}
    # ... so later steps gather them with it: no more on-access gathers
    before = _stats(engine)["on_access"]
    train(engine, 2, first_step=6)
    assert _stats(engine)["on_access"] == before > 0

    # outside a step, touching a released parameter raises, naming it
    w = engine.module.blocks[0].attn.out_proj.weight
    name = "blocks.0.attn.out_proj.weight"
    assert w.shape == (32, 32) and w.dtype == torch.float32  # metadata stays available
    for touch in (lambda: w.sum(), lambda: w * 2, lambda: torch.nn.functional.linear(torch.ones(1, 32), w),
                  lambda: w.data.sum(), lambda: w.detach().clone(), lambda: copy.deepcopy(w)):
        with pytest.raises(ReleasedParameterError, match=rf"parameter {name} .*GatheredParameters"):
            touch()
    assert "released" in repr(w)
    # state_dict() lists every name (checkpoint code relies on it) but its released entries hold no values
    sd = engine.module.state_dict()
    assert isinstance(sd["blocks.0.attn.out_proj.weight"], ReleasedTensor)
    assert sd["tok.weight"].shape == (64, 32)
    with pytest.raises(ReleasedParameterError, match="parameter tok.weight"):
        torch.save(sd, io.BytesIO())
    with pytest.raises(ReleasedParameterError, match="parameter tok.weight"):
        sd["tok.weight"] + 1
    with pytest.raises(ReleasedParameterError, match=name):
        with torch.no_grad():
            w.copy_(torch.zeros(32, 32))
    # inside GatheredParameters (every rank) the real values are there, equal to the consolidated ones
    full = gathered_state_dict(engine, rank0_only=False)
    with GatheredParameters(list(engine.module.parameters())):
        sd = {k: v.clone() for k, v in engine.module.state_dict().items()}
    assert set(sd) == set(full)
    for k in full:
        assert torch.equal(sd[k], full[k]), k
    # evaluation after training still agrees with DDP's model
    ddp = copy.deepcopy(model)
    ddp_losses(ddp, 8)
    from ._train import batch

    x, y = batch(4, 99)
    with torch.no_grad():
        assert abs(float(engine(x, y)) - float(ddp(x, y))) < 1e-5


@pytest.mark.world_size(4)
def test_multihead_attention_matches_ddp_on_4_ranks():
    model = make("mha")
    ref = ddp_losses(copy.deepcopy(model), 4)
    ours, _ = engine_losses(copy.deepcopy(model), 4, zero_optimization=ZERO)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)


@pytest.mark.world_size(2)
def test_registered_external_parameters_and_init_built_model():
    """Built under ``ds_zero.Init`` (never whole on a rank) with ``out_proj`` declared external up front
    (DeepSpeed's ``register_external_parameter``): trains like DDP and never needs an on-access gather."""
    import ds_core
    from ds_zero import Init, register_external_parameter

    from ._external import MHAGPT

    ref = ddp_losses(make("mha"), 6)
    torch.manual_seed(0)
    with Init():
        model = MHAGPT()
    for block in model.blocks:
        register_external_parameter(block.attn, block.attn.out_proj.weight)
        register_external_parameter(block.attn, block.attn.out_proj.bias)
    engine = ds_core.initialize(model=model, config=config(zero_optimization=ZERO))[0]
    ours = train(engine, 6)
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    assert _stats(engine)["on_access"] == 0
    assert dist.get_world_size() == 2
