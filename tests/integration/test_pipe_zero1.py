"""Pipeline × data parallelism with ZeRO stage 1 on the data axis, composed through ds-core's seams."""

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.engine.checkpoint import CheckpointError
from ds_core.testing import run_distributed
from tests.ds_pipe import _gpt
from tests.ds_pipe.test_parity import check_two_stages_two_replicas_tied


def test_two_stages_two_replicas_zero1_tied():
    check_two_stages_two_replicas_tied({"zero_optimization": {"stage": 1}})


def _build(seed: int, stage: int):
    from ds_pipe import PipelineModule

    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=2)
    model = PipelineModule(_gpt.specs(True), topology=topo, loss_fn=_gpt.loss_fn, seed_layers=True, base_seed=seed)
    config = _gpt.config(bf16={"enabled": True}, zero_optimization={"stage": stage},
                         optimizer={"type": "AdamW", "params": {"lr": _gpt.LR}})
    return ds_core.initialize(model=model, config=config)[0], topo.coordinates(dist.get_rank())["data"]


def _state(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _batches(engine, data, steps):
    return [float(engine.train_batch(_gpt.data_iter(1, data, start=s))) for s in steps]


def _save_reload_continue(path):
    engine, data = _build(1234, stage=1)
    _batches(engine, data, range(3))
    engine.save_checkpoint(path, tag="three")
    saved = _state(engine)
    uninterrupted = _batches(engine, data, (3, 4))
    end = _state(engine)

    # a freshly built model with other initial weights continues bit-identically
    resumed, _ = _build(99, stage=1)
    resumed.load_checkpoint(path, tag="three")
    assert all(torch.equal(saved[k], v) for k, v in _state(resumed).items())
    again = _batches(resumed, data, (3, 4))
    same_weights = all(torch.equal(end[k], v) for k, v in _state(resumed).items())

    # lr = 0 after the reload: one batch leaves the loaded weights exactly as they are (stale fp32
    # masters of the fresh model's own weights would overwrite them)
    frozen, _ = _build(7, stage=1)
    frozen.load_checkpoint(path, tag="three")
    for group in frozen.optimizer.param_groups:
        group["lr"] = 0.0
    _batches(frozen, data, (3,))
    moved = max(float((v.float() - saved[k].float()).abs().max()) for k, v in _state(frozen).items())
    return uninterrupted, again, same_weights, moved


@pytest.mark.parametrize("world", [2, 4])
def test_bf16_zero1_checkpoint_reloads_into_a_fresh_model_and_continues_bit_identically(tmp_path, world):
    """2 ranks: 2 stages × 1 data rank; 4 ranks: 2 stages × 2 data ranks (the masters partitioned)."""
    for uninterrupted, again, same_weights, moved in run_distributed(_save_reload_continue, world,
                                                                      args=(str(tmp_path),), timeout=300):
        assert again == uninterrupted  # exact: same losses, bit for bit
        assert same_weights
        assert moved == 0.0


def _load_under(path, saved_stage, load_stage):
    engine, data = _build(1234, stage=saved_stage)
    _batches(engine, data, range(1))
    engine.save_checkpoint(path, tag="one")
    other, _ = _build(5, stage=load_stage)
    with pytest.raises(CheckpointError) as info:
        other.load_checkpoint(path, tag="one")
    other.load_checkpoint(path, tag="one", load_optimizer_states=False)  # the layers alone still load
    return str(info.value), all(torch.equal(v, _state(engine)[k]) for k, v in _state(other).items())


@pytest.mark.parametrize("saved, loaded, found, expected", [
    (1, 0, "ZeRO stage 1 state (layout 'zero')", "data parallel (stage 0) expects layout 'replicated'"),
    (0, 1, "data parallel (stage 0) state (layout 'replicated')", "ZeRO stage 1 expects layout 'zero'"),
])
def test_a_pipeline_checkpoint_under_another_zero_stage_names_both_layouts(tmp_path, saved, loaded, found,
                                                                           expected):
    for message, weights_loaded in run_distributed(_load_under, 2, args=(str(tmp_path), saved, loaded),
                                                   timeout=300):
        assert found in message and expected in message and "load_optimizer_states=False" in message
        assert weights_loaded
