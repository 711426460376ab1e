"""Optimizer and scheduler params are checked when the config is parsed — before any process group
exists — from the schemas the builders use too."""

import inspect

import pytest
import torch

import ds_core
from ds_core.config import parse_config
from ds_core.config.optim import REQUIRED, SCHEDULER_PARAMS
from ds_core.engine import schedulers
from ds_core.errors import ConfigError


def _config(optimizer=None, scheduler=None):
    config = {"train_batch_size": 8}
    if optimizer:
        config["optimizer"] = optimizer
    if scheduler:
        config["scheduler"] = scheduler
    return config


@pytest.mark.parametrize("optimizer, scheduler, message", [
    ({"type": "AdamW", "params": {"lr": 1e-3, "betas1": 0.9}}, None, r"optimizer AdamW: unknown param 'betas1' \(did you "
                                                                      r"mean 'betas'\?\)"),
    ({"type": "AdamW", "params": {"lr": "fast"}}, None, r"optimizer AdamW: lr 'fast' must be a finite number"),
    ({"type": "AdamW", "params": {"betas": 0.9}}, None, r"betas 0.9 must be two numbers"),
    ({"type": "Adam", "params": {"max_grad_norm": 1.0}}, None, r"clip with the top-level \"gradient_clipping\" instead"),
    ({"type": "SGD", "params": {"nesterov": True}}, None, r"nesterov true needs momentum > 0"),
    ({"type": "Lamb", "params": {"min_coeff": 2.0, "max_coeff": 1.0}}, None, r"need 0 <= min_coeff <= max_coeff"),
    ({"type": "OneBitAdam", "params": {"freeze_step": -1}}, None, r"freeze_step -1 must be a whole number >= 1"),
    ({"type": "Muon", "params": {}}, None, r"asks for the Muon optimizer"),
    ({"type": "RMSprop", "params": {}}, None, r"torch.optim class ds does not build yet; build it yourself and pass "
                                              r"optimizer=torch.optim.RMSprop"),
    (None, {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}, r"WarmupDecayLR needs total_num_steps"),
    (None, {"type": "WarmupLR", "params": {"warmup_max": 0.1}}, r"unknown param 'warmup_max' \(did you mean "
                                                                 r"'warmup_max_lr'\?\)"),
    (None, {"type": "WarmupLR", "params": {"warmup_num_steps": 2.5}}, r"warmup_num_steps 2.5 must be a whole number"),
    (None, {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "cos_min_ratio": 2}},
     r"cos_min_ratio 2 must lie in \[0, 1\]"),
    (None, {"type": "OneCycle", "params": {"cycle_min_lr": 0.1}}, r"OneCycle needs cycle_max_lr"),
    (None, {"type": "LRRangeTest", "params": {"lr_range_test_staircase": "yes"}}, r"must be true or false"),
    (None, {"type": "StepLR", "params": {}}, r"torch.optim.lr_scheduler class that ds does not build"),
    (None, {"type": "warmuplr", "params": {}}, r"did you mean 'WarmupLR'"),
])
def test_bad_params_fail_at_parse_time_before_any_process_group(optimizer, scheduler, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(optimizer, scheduler))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=message):
        ds_core.initialize(model=model, config=_config(optimizer, scheduler))
    assert not torch.distributed.is_initialized()


def test_the_schedule_schema_is_the_classes_signature():
    for name, schema in SCHEDULER_PARAMS.items():
        cls = schedulers._CLASSES[name]
        signature = list(inspect.signature(cls.__init__).parameters.values())[2:]
        assert [p.name for p in signature] == list(schema), name
        for p in signature:
            default = schema[p.name][1]
            assert (p.default is inspect.Parameter.empty) == (default is REQUIRED), (name, p.name)
            if default is not REQUIRED:
                assert p.default == default, (name, p.name)


def test_builders_read_the_same_schemas():
    from ds_core.config import optim
    from ds_core.engine import optimizers

    assert optimizers.OPTIMIZER_DEFAULTS is optim.OPTIMIZER_DEFAULTS
    assert schedulers.scheduler_params("WarmupDecayLR") == optim.scheduler_params("WarmupDecayLR")


def test_numbers_written_as_strings_still_read_in_params():
    """YAML 1.1 readers turn 1e-5 into the string "1e-5"; params take it as the number."""
    config = parse_config(_config({"type": "AdamW", "params": {"lr": "1e-5", "eps": "1e-8"}}))
    assert config.optimizer.params["lr"] == "1e-5"
