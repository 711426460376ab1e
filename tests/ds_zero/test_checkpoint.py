"""ZeRO checkpoints: exact resume at the same world size, re-partitioning 2 -> 1 and 1 -> 2 ranks with
training continuing at equal loss (to 1e-5: one rank on the concatenated batches of two), and a
checkpoint whose partition layout does not fit the model rejected before anything changes."""

import copy
import json

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.engine.checkpoint import CheckpointError

from ._train import batch, config, make_model, max_diff, train


@pytest.mark.world_size(2)
def test_same_world_resume_is_exact(tmp_path):
    for stage, extra in ((1, {"bf16": {"enabled": True}}), (2, {"zero_optimization": {
            "stage": 2, "reduce_bucket_size": 2000, "offload_optimizer": {"device": "cpu"}}})):
        model = make_model()
        engine, *_ = ds_core.initialize(model=copy.deepcopy(model), config=config(stage=stage, **extra))
        train(engine, 2)
        engine.save_checkpoint(tmp_path / f"s{stage}", client_state={"data_step": 2})
        after = train(engine, 3, first_step=2)
        fresh, *_ = ds_core.initialize(model=copy.deepcopy(model), config=config(stage=stage, **extra))
        _, client = fresh.load_checkpoint(tmp_path / f"s{stage}")
        assert client["data_step"] == 2 and fresh.global_steps == 2
        assert train(fresh, 3, first_step=2) == after
    meta = json.loads((tmp_path / "s2" / "global_step2" / "meta.json").read_text())
    assert meta["zero"]["world_size"] == 2 and meta["zero"]["groups"][0]["params"][0]["name"]
    assert (tmp_path / "s2" / "global_step2" / "zero_rank1.safetensors").is_file()


def _continue(engine, steps, first, world):
    """Losses of the next steps, averaged over ranks; a 1-rank run sees both ranks' batches."""
    if world == 1:
        out = []
        acc = engine.gradient_accumulation_steps()
        for step in range(first, first + steps):
            x0, y0 = batch(4, step, rank=0)
            x1, y1 = batch(4, step, rank=1)
            loss = engine(torch.cat([x0, x1]), torch.cat([y0, y1]))
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        assert acc == 1
        return out
    losses = torch.tensor(train(engine, steps, first_step=first), dtype=torch.float64)
    dist.all_reduce(losses)
    return (losses / world).tolist()


def _phase(root, load_from, save_to, world, stage):
    micro = 8 if world == 1 else 4
    engine, *_ = ds_core.initialize(model=make_model(), config=config(stage=stage, micro=micro))
    if load_from is None:
        _continue(engine, 3, 0, world)
    else:
        with pytest.warns(UserWarning, match="re-sliced"):
            engine.load_checkpoint(root / load_from)
    assert engine.global_steps == 3
    if save_to:
        engine.save_checkpoint(root / save_to)
    return _continue(engine, 3, 3, world)


def test_repartition_2_to_1_and_1_to_2(tmp_path, distributed):
    two = distributed.run(_phase, 2, args=(tmp_path, None, "two", 2, 2))[0]
    one = distributed.run(_phase, 1, args=(tmp_path, "two", "one", 1, 1))[0]  # also stage 2 -> stage 1
    back = distributed.run(_phase, 2, args=(tmp_path, "one", None, 2, 2))[0]
    assert max_diff(one, two) < 1e-5, (one, two)
    assert max_diff(back, two) < 1e-5, (back, two)


@pytest.mark.world_size(2)
def test_layout_mismatch_is_rejected_before_any_change(tmp_path):
    engine, *_ = ds_core.initialize(model=make_model(), config=config(stage=2))
    train(engine, 1)
    engine.save_checkpoint(tmp_path)
    model = make_model(seed=1)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    other, *_ = ds_core.initialize(model=model, model_parameters=[{"params": decay}, {"params": rest}],
                                   config=config(stage=2))
    before = {k: v.clone() for k, v in other.module.state_dict().items()}
    masters = [m.detach().clone() for m in other.optimizer.masters]
    with pytest.raises(CheckpointError, match="partition layout does not match"):
        other.load_checkpoint(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.module.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(masters, other.optimizer.masters))
    assert other.global_steps == 0


def test_stage_0_checkpoint_needs_model_only_load(tmp_path):
    engine, *_ = ds_core.initialize(model=make_model(), config=config(stage=0))
    engine.save_checkpoint(tmp_path)
    zero, *_ = ds_core.initialize(model=make_model(seed=3), config=config(stage=1))
    with pytest.raises(CheckpointError, match="load_optimizer_states=False"):
        zero.load_checkpoint(tmp_path)
    zero.load_checkpoint(tmp_path, load_optimizer_states=False)
    assert torch.equal(zero.module.tok.weight, engine.module.tok.weight)


@pytest.mark.world_size(2)
def test_a_model_file_disagreeing_with_the_masters_is_refused_on_every_rank(tmp_path):
    """The model's weights changed behind the strategy's back (in place, not through load_state_dict),
    then saved: model.safetensors no longer matches the fp32 masters (its checksum is fine). Loaded as
    it is, each rank would hold the model file's weights except its own partition (the masters) and
    step from different weights; the load is refused, and training refused until a good load
    (weights only, here) makes every rank agree."""
    engine, *_ = ds_core.initialize(model=make_model(), config=config(stage=2, bf16={"enabled": True}))
    train(engine, 2)
    with torch.no_grad():
        engine.module.blocks[0].proj.weight.mul_(2)
    engine.save_checkpoint(tmp_path)
    other, *_ = ds_core.initialize(model=make_model(seed=1), config=config(stage=2, bf16={"enabled": True}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors and the fp32 masters in zero_rank\*\.safetensors "
                                              r"disagree \((parameter blocks\.0\.proj\.weight differs|found on another "
                                              r"rank).*ranks step from different weights"):
        other.load_checkpoint(tmp_path)
    with pytest.raises(ds_core.errors.DSError, match="cannot step: loading .* failed after the model weights"):
        train(other, 1, first_step=2)
    other.load_checkpoint(tmp_path, load_optimizer_states=False)  # the model file's weights, masters follow
    train(other, 1, first_step=2)
    mine = torch.cat([p.detach().float().reshape(-1) for p in other.module.parameters()])
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    assert torch.equal(mine, theirs)  # every rank holds the same weights
