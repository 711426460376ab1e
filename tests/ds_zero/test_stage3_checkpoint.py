"""Stage-3 checkpoints: resume bit-identically, re-shard to another world size, consolidated weights."""

import copy

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ds_core

from ._train import config, make_model, max_diff, train

ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 40, "stage3_gather_16bit_weights_on_model_save": True}


def _engine(model, **over):
    return ds_core.initialize(model=model, config=config(zero_optimization=dict(ZERO3, **over)))[0]


@pytest.mark.world_size(2)
def test_resume_is_bit_identical_and_consolidated_weights_match(tmp_path):
    root = tmp_path
    model = make_model()
    straight = _engine(copy.deepcopy(model))
    full = train(straight, 8)
    first = _engine(copy.deepcopy(model))
    train(first, 4)
    path = first.save_checkpoint(root, client_state={"epoch": 3})
    files = sorted(p.name for p in path.iterdir())
    assert "zero_rank0.safetensors" in files and "zero_rank1.safetensors" in files
    assert "model_16bit.safetensors" in files
    second = _engine(copy.deepcopy(model))
    _, client = second.load_checkpoint(root)
    assert client["epoch"] == 3 and second.global_steps == 4
    rest = train(second, 4, first_step=4)
    assert rest == full[4:], (rest, full[4:])
    # the consolidated file holds the gathered weights under every name (tied ones included)
    state = load_file(str(path / "model_16bit.safetensors"))
    assert set(state) == set(model.state_dict())
    assert torch.equal(state["tok.weight"], state["head.weight"])
    ref = make_model()
    ref.load_state_dict(state)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    first.eval()
    with torch.no_grad():
        assert abs(float(ref(x, y)) - float(first(x, y))) < 1e-6
    dist.barrier()


def _phase(root, load_from, save_to, world, zero):
    from .test_checkpoint import _continue

    engine, *_ = ds_core.initialize(model=make_model(seed=1), config=config(
        micro=8 if world == 1 else 4, zero_optimization=zero))
    if load_from is None:
        _continue(engine, 3, 0, world)
    else:
        with pytest.warns(UserWarning, match="re-sliced"):
            engine.load_checkpoint(root / load_from)
    assert engine.global_steps == 3
    if save_to:
        engine.save_checkpoint(root / save_to)
    return _continue(engine, 3, 3, world)


def test_reshard_2_to_1_and_back(tmp_path, distributed):
    zero = dict(ZERO3, stage3_gather_16bit_weights_on_model_save=False)
    two = distributed.run(_phase, 2, args=(tmp_path, None, "two", 2, zero))[0]
    one = distributed.run(_phase, 1, args=(tmp_path, "two", "one", 1, zero))[0]
    back = distributed.run(_phase, 2, args=(tmp_path, "one", None, 2, zero))[0]
    assert max_diff(one, two) < 1e-5, (one, two)
    assert max_diff(back, two) < 1e-5, (back, two)


@pytest.mark.world_size(2)
def test_stage_2_checkpoint_loads_weights_into_stage_3(tmp_path):
    engine = ds_core.initialize(model=make_model(), config=config(stage=2))[0]
    train(engine, 2)
    engine.save_checkpoint(tmp_path)
    z3 = _engine(make_model(seed=1))
    with pytest.raises(ds_core.errors.DSError, match="load_optimizer_states=False"):
        z3.load_checkpoint(tmp_path)
    z3.load_checkpoint(tmp_path, load_optimizer_states=False)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert abs(float(engine(x, y)) - float(z3(x, y))) < 1e-6
