"""The parsed config reads like DeepSpeed's ``engine.config`` dict (Accelerate, Lightning and user code
do ``engine.config["zero_optimization"]["stage"]``, ``.get(...)``, ``in``)."""

import json
import warnings

import pytest
import torch

from ds_core.config import ConfigWarning, parse_config

CONFIG = {
    "_comment": "a Hugging Face style config",
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "_note": "x",
                          "offload_optimizer": {"device": "cpu"}},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "flops_profiler": {"enabled": False},
    "project_notes": {"owner": "me"},
}


def _parse(config, dp=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return parse_config(config, data_parallel_size=dp)


def test_sections_read_as_dicts_with_every_value_in_effect():
    config = _parse(CONFIG, dp=2)
    zero = config["zero_optimization"]
    assert isinstance(zero, dict) and zero["stage"] == 2
    assert zero["reduce_bucket_size"] == 500_000_000  # "auto": DeepSpeed's default, as DeepSpeed reads it
    assert zero["offload_optimizer"]["device"] == "cpu" and "pin_memory" in zero["offload_optimizer"]
    assert "_note" not in zero and "_comment" not in config
    assert config["bf16"]["enabled"] is True
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3}}
    assert config["flops_profiler"]["enabled"] is False  # a section of ds-core's: defaults filled in
    assert config["project_notes"] == {"owner": "me"}


def test_get_in_keys_and_the_resolved_batch():
    config = _parse(CONFIG, dp=2)
    assert config.get("train_micro_batch_size_per_gpu") == 2
    assert config.get("gradient_accumulation_steps") == 1  # solved
    assert config.get("train_batch_size") == 4 and "train_batch_size" in config
    assert "fp16" not in config and config.get("fp16") is None and config.get("fp16", {}) == {}
    assert "zero_optimization" in config and "tensor_parallel" not in config
    with pytest.raises(KeyError):
        config["fp16"]
    assert set(config.keys()) == set(config) == {k for k in CONFIG if not k.startswith("_")} | {"train_batch_size"}
    assert dict(config.items()) == config.to_dict() and len(config) == len(config.to_dict())
    json.dumps(config.to_dict())  # plain data, as DeepSpeed's dict is


def test_attributes_still_work_and_the_object_is_truthy():
    config = _parse({"train_batch_size": 4})
    assert config.fp16.enabled is False and config.section("zero_optimization") is None
    assert bool(config) and config.to_dict() == {"train_batch_size": 4}


@pytest.mark.world_size(2)
def test_engine_config_reads_like_deepspeeds():
    import ds_core

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, *_ = ds_core.initialize(model=torch.nn.Linear(4, 2), config={
            "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
            "zero_optimization": {"stage": 2, "contiguous_gradients": False},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    try:
        assert engine.config["zero_optimization"]["stage"] == 2
        assert engine.config.get("train_micro_batch_size_per_gpu") == 2
        assert engine.config.get("train_batch_size") == 4 and "gradient_accumulation_steps" in engine.config
        assert "fp16" not in engine.config
        notes = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
        rank = torch.distributed.get_rank()
        assert len(notes) == (1 if rank == 0 else 0), notes  # one warning, on rank 0 only
        assert "'zero_optimization.contiguous_gradients'" in "".join(notes) or rank != 0
    finally:
        engine.destroy()
