"""Strict values: no silent coercion, no NaN, no negative counts — each refused naming the value, the
rule and the fix; the forms real DeepSpeed configs use (5e8 for counts, "true" strings) still work."""

import math

import pytest

from ds_core.config import parse_config
from ds_core.errors import ConfigError

BASE = {"train_batch_size": 8}


def _with(**keys):
    return {**BASE, **keys}


@pytest.mark.parametrize("config, message", [
    (_with(train_micro_batch_size_per_gpu=True), r"train_micro_batch_size_per_gpu = True is invalid: true is a boolean, "
                                                 r"not a number; write a whole number"),
    (_with(fp16={"enabled": "yes"}), r"fp16.enabled = 'yes' is invalid: 'yes' is not a boolean; write true or false"),
    (_with(fp16={"enabled": 1}), r"fp16.enabled = 1 is invalid: the number 1 is not a boolean; write true or false"),
    (_with(bf16={"enabled": "on"}), r"bf16.enabled = 'on' is invalid: 'on' is not a boolean"),
    (_with(zero_optimization={"stage": "2"}), r"zero_optimization.stage = '2' is invalid: '2' is a string; write the "
                                              r"whole number without quotes \(2\)"),
    (_with(zero_optimization={"stage": 2.5}), r"zero_optimization.stage = 2.5 is invalid: 2.5 is not a whole number"),
    (_with(zero_optimization={"stage": 2, "overlap_comm": "yes"}), r"overlap_comm = 'yes' is invalid"),
    (_with(gradient_clipping=math.nan), r"gradient_clipping = nan is invalid: nan is not a finite number"),
    (_with(gradient_clipping=math.inf), r"gradient_clipping = inf is invalid: inf is not a finite number"),
    (_with(gradient_clipping=-1.0), r"gradient_clipping = -1.0 is invalid: -1.0 must be >= 0"),
    (_with(gradient_clipping="1.0"), r"gradient_clipping = '1.0' is invalid: '1.0' is a string; write the number "
                                     r"without quotes"),
    (_with(steps_per_print=-1), r"steps_per_print = -1 is invalid: -1 must be a whole number >= 0.*0 \(or null\) "
                                r"turns it off"),
    (_with(activation_checkpointing={"number_checkpoints": -1}),
     r"activation_checkpointing.number_checkpoints = -1 is invalid: -1 must be > 0"),
    (_with(seed=-1), r"seed = -1 is invalid: -1 is outside the seed range \[0, 2\*\*32 - 1\]"),
    (_with(seed=2**32), r"seed = 4294967296 is invalid"),
    (_with(gradient_accumulation_steps=0), r"gradient_accumulation_steps = 0 is invalid: 0 must be a whole number >= 1"),
    (_with(gradient_accumulation_steps="8"), r"gradient_accumulation_steps = '8' is invalid: '8' is a string"),
    (_with(train_batch_size=-8), r"train_batch_size = -8 is invalid"),
    (_with(gradient_predivide_factor=0), r"gradient_predivide_factor = 0 is invalid: 0.0 must be > 0"),
    (_with(fp16={"loss_scale": math.nan}), r"fp16.loss_scale = nan is invalid"),
    (_with(fp16={"enabled": True, "min_loss_scale": 0}), r"fp16.min_loss_scale 0.0 must be > 0 with dynamic loss "
                                                         r"scaling"),
    (_with(zero_optimization={"stage": 2, "reduce_bucket_size": math.inf}), r"reduce_bucket_size = inf is invalid"),
    (_with(wall_clock_breakdown="no"), r"wall_clock_breakdown = 'no' is invalid"),
    (_with(steps_per_print="auto"), r"'auto' is not allowed for this key; write a whole number"),
])
def test_coerced_or_impossible_values_are_refused_with_the_fix(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_forms_real_configs_use_are_accepted():
    config = parse_config({
        "train_batch_size": 16.0, "steps_per_print": 1e10, "gradient_clipping": 1, "seed": 1234,
        "fp16": {"enabled": "true", "loss_scale": 0, "initial_scale_power": 16.0, "min_loss_scale": 1},
        "wall_clock_breakdown": "False",
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
                              "sub_group_size": 1e12},
        "communication_data_type": "FP32",
    })
    assert config.train_batch_size == 16 and isinstance(config.train_batch_size, int)
    assert config.steps_per_print == 10_000_000_000 and config.gradient_clipping == 1.0
    assert config.fp16.enabled is True and config.wall_clock_breakdown is False
    assert config.fp16.initial_scale_power == 16 and config.communication_data_type == "fp32"
    zero = config.section("zero_optimization")
    assert (zero.reduce_bucket_size, zero.stage3_max_live_parameters) == (500_000_000, 1_000_000_000)


def test_steps_per_print_zero_and_null_turn_the_log_off():
    assert parse_config(_with(steps_per_print=0)).steps_per_print == 0
    assert parse_config(_with(steps_per_print=None)).steps_per_print is None


def test_static_loss_scale_or_disabled_fp16_takes_any_floor():
    """DeepSpeed checks min_loss_scale only for dynamic scaling; so does ds (real configs carry 0)."""
    assert parse_config(_with(fp16={"enabled": True, "loss_scale": 512, "min_loss_scale": 0})).fp16.min_loss_scale == 0
    assert parse_config(_with(fp16={"enabled": False, "min_loss_scale": 0})).fp16.min_loss_scale == 0


def test_strict_rules_apply_to_feature_sections_built_on_section():
    """A package's section model (ds-zero's here) inherits the rules from ds_core.config.Section."""
    from ds_zero.config import ZeroConfig

    with pytest.raises(ValueError, match="'3' is a string"):
        ZeroConfig(stage="3")
    with pytest.raises(ValueError, match="not a boolean"):
        ZeroConfig(overlap_comm=1)
    assert ZeroConfig(overlap_comm="true").overlap_comm is True


def test_assignment_is_checked_too():
    config = parse_config(BASE)
    with pytest.raises(ValueError, match="not a boolean"):
        config.wall_clock_breakdown = "yes"
