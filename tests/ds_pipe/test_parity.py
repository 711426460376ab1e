"""Pipelined training equals the unpipelined model on the same micro-batches (fp32, 1e-5)."""

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.testing import run_distributed

from . import _gpt

STEPS = 10


def _train(pipe: int, tied: bool, extra: dict, module_kwargs: dict, steps: int = STEPS):
    from ds_pipe import PipelineModule

    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=pipe)
    model = PipelineModule(_gpt.specs(tied), topology=topo, loss_fn=_gpt.loss_fn, seed_layers=True, **module_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=_gpt.LR)
    engine, *_ = ds_core.initialize(model=model, optimizer=opt, config=_gpt.config(**extra))
    it = _gpt.data_iter(steps, topo.coordinates(dist.get_rank())["data"])
    losses = [float(engine.train_batch(it)) for _ in range(steps)]
    tied_weight = None
    if tied:
        tied_weight = model.tied_parameters("embed")[0].detach().clone()
    return losses, tied_weight, engine.get_global_grad_norm()


@pytest.mark.parametrize("tied,kwargs,extra", [
    pytest.param(False, {}, {}, marks=pytest.mark.smoke),
    (True, {"activation_checkpoint_interval": 1}, {"gradient_clipping": 1.0}),
])
def test_two_stages(tied, kwargs, extra):
    ref = _gpt.reference_losses(STEPS, tied, 1, clip=extra.get("gradient_clipping", 0.0))
    results = run_distributed(_train, 2, args=(2, tied, extra, kwargs), timeout=120)
    for losses, _, _ in results:
        assert losses == pytest.approx(ref, abs=1e-5)
    if tied:  # the two copies of the tied embedding stayed identical
        assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == pytest.approx(results[1][2])  # one global norm on every stage


def check_two_stages_two_replicas_tied(extra: dict):
    """2 stages × 2 data replicas on 4 ranks; ``extra`` config (the integration tests add ZeRO-1)."""
    ref = _gpt.reference_losses(STEPS, True, 2)
    results = run_distributed(_train, 4, args=(2, True, extra, {}), timeout=150)
    for losses, _, _ in results:
        assert losses == pytest.approx(ref, abs=1e-5)
    assert all(torch.equal(results[0][1], r[1]) for r in results)


def test_two_stages_two_replicas_tied():
    check_two_stages_two_replicas_tied({})
