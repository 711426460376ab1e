"""Config loading: DeepSpeed JSON works unchanged; every kind of bad input fails with a useful message."""

import json

import pytest

from ds_core.config import Section, parse_config, resolve_batch
from ds_core.errors import ConfigError

DEEPSPEED_CONFIG = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "steps_per_print": 5,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                               "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                                                  "warmup_num_steps": 100}},
    "bf16": {"enabled": True},
    "comms_logger": {"enabled": True, "verbose": False, "prof_all": True},
    "wall_clock_breakdown": False,
    "flops_profiler": {"enabled": False},
}


def test_deepspeed_config_from_dict_string_and_file(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(DEEPSPEED_CONFIG))
    for source in (DEEPSPEED_CONFIG, json.dumps(DEEPSPEED_CONFIG), str(path), path):
        config = parse_config(source, data_parallel_size=2)
        assert config.precision == "bf16"
        assert config.optimizer.params["lr"] == 3e-4
        assert config.batch.train_batch_size == 32 and config.batch.gradient_accumulation_steps == 4


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="'train_batch_sise'.*did you mean 'train_batch_size'"):
        parse_config({"train_batch_sise": 8})


def test_unknown_nested_key_names_nearest():
    with pytest.raises(ConfigError, match=r"fp16\.'initial_scale_powr'.*did you mean 'initial_scale_power'"):
        parse_config({"train_batch_size": 8, "fp16": {"enabled": True, "initial_scale_powr": 12}})


def test_duplicate_json_key_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "fp16": {"enabled": true}, "train_batch_size": 16}')
    with pytest.raises(ConfigError, match="'train_batch_size' appears twice"):
        parse_config(path)


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json: malformed JSON at line 3"):
        parse_config(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="neither a JSON object string nor an existing file"):
        parse_config("no/such/config.json")


def test_impossible_batch_triple_shows_arithmetic():
    with pytest.raises(ConfigError, match=r"train_batch_size 32 != 4 micro × 2 accumulation × 3 ranks = 24"):
        parse_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                      "gradient_accumulation_steps": 2}, data_parallel_size=3)


@pytest.mark.parametrize("given,dp,expected", [
    ((32, 4, None), 2, (32, 4, 4)),
    ((32, None, 2), 2, (32, 8, 2)),
    ((None, 4, 2), 2, (16, 4, 2)),
    ((16, None, None), 4, (16, 4, 1)),
    ((None, 3, None), 2, (6, 3, 1)),
])
def test_batch_resolution(given, dp, expected):
    b = resolve_batch(*given, dp)
    assert (b.train_batch_size, b.micro_batch_size, b.gradient_accumulation_steps) == expected


def test_batch_not_divisible():
    with pytest.raises(ConfigError, match="not divisible by 3 micro × 2 ranks"):
        resolve_batch(10, 3, None, 2)


def test_batch_missing():
    with pytest.raises(ConfigError, match="no batch size given"):
        parse_config({"gradient_accumulation_steps": 2}, data_parallel_size=1)


def test_auto_values_accepted():
    config = parse_config({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                           "bf16": {"enabled": "auto"},
                           "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
                          data_parallel_size=2)
    assert config.batch.train_batch_size == 4
    assert config.precision == "fp32"


def test_fp16_and_bf16_together():
    with pytest.raises(ConfigError, match="both true"):
        parse_config({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_bfloat16_alias():
    assert parse_config({"train_batch_size": 2, "bfloat16": {"enabled": True}}).precision == "bf16"


def test_unknown_optimizer_and_scheduler():
    with pytest.raises(ConfigError, match="optimizer.type 'Adamm'.*did you mean 'Adam'"):
        parse_config({"train_batch_size": 8, "optimizer": {"type": "Adamm"}})
    with pytest.raises(ConfigError, match="scheduler.type 'WarmupLr'"):
        parse_config({"train_batch_size": 8, "scheduler": {"type": "WarmupLr"}})


def test_type_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"fp16\.loss_scale_window = 0 is invalid"):
        parse_config({"train_batch_size": 8, "fp16": {"loss_scale_window": 0}})


def test_feature_section_of_missing_package(monkeypatch):
    from ds_core import plugins

    monkeypatch.setattr(plugins, "feature_for_section", lambda section: None)
    with pytest.raises(ConfigError, match=r"needs the ds-zero package.*pip install ds-zero"):
        parse_config({"train_batch_size": 8, "zero_optimization": {"stage": 2}})


class _PipeSection(Section):
    stages: int = 1


def test_feature_section_validated_by_owner(monkeypatch):
    from ds_core import plugins

    spec = plugins.FeatureSpec(name="pipe", module="x", dist="ds-pipe", config_section="pipeline",
                               config_model=f"{__name__}:_PipeSection")
    monkeypatch.setattr(plugins, "feature_for_section", lambda s: spec if s == "pipeline" else None)
    config = parse_config({"train_batch_size": 8, "pipeline": {"stages": 2}})
    assert config.section("pipeline").stages == 2
    with pytest.raises(ConfigError, match=r"pipeline\.'stagse'.*did you mean 'stages'"):
        parse_config({"train_batch_size": 8, "pipeline": {"stagse": 2}})


def test_accepted_deepspeed_key_without_effect_warns():
    with pytest.warns(UserWarning, match="'autotuning' is accepted but has no effect"):
        parse_config({"train_batch_size": 8, "autotuning": {"enabled": True}})
