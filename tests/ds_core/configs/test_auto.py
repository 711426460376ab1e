"""``"auto"`` resolved as the Hugging Face Trainer does, and refused where a number is needed."""

import copy
import json

import pytest

from ds_core.config import parse_config, resolve_auto
from ds_core.errors import ConfigError

from . import corpus

HF = corpus.HERE / "corpus" / "huggingface__transformers"
TRAINER = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2, learning_rate=3e-5,
               weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5,
               warmup_steps=0, num_training_steps=500, hidden_size=64, fp16=False, bf16=True)


def _load(name):
    return json.loads((HF / name).read_text())


def test_hugging_face_zero2_config_is_filled_from_the_trainer():
    raw = _load("tests__deepspeed__ds_config_zero2.json")
    before = copy.deepcopy(raw)
    used = resolve_auto(raw, **TRAINER)
    assert raw == before  # the input is not modified
    assert (used["train_micro_batch_size_per_gpu"], used["gradient_accumulation_steps"], used["train_batch_size"]) == (
        4, 2, 16)
    assert used["gradient_clipping"] == 0.5
    assert used["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.01}
    assert used["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 1}
    assert used["fp16"]["enabled"] is False and used["bf16"]["enabled"] is True
    assert used["zero_optimization"]["reduce_bucket_size"] == 2e8  # explicit values stay
    config = parse_config(used, data_parallel_size=2)
    assert config.precision == "bf16" and config.batch.train_batch_size == 16


def test_hidden_size_fills_the_zero3_bucket_sizes():
    used = resolve_auto(_load("tests__deepspeed__ds_config_zero3_bf16.json"), **TRAINER)
    zero = used["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert used["bfloat16"]["enabled"] is True  # the older spelling of bf16 is filled too
    section = parse_config(used, data_parallel_size=2).section("zero_optimization")
    assert section.stage3_param_persistence_threshold == 640


def test_stage_2_fills_only_the_reduce_bucket():
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}}
    zero = resolve_auto(raw, hidden_size=8)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 and zero["stage3_prefetch_bucket_size"] == "auto"


def test_schedule_steps_come_from_the_trainer():
    raw = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                             "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
    params = resolve_auto(raw, num_training_steps=1000, warmup_steps=30, learning_rate=1e-4)["scheduler"]["params"]
    assert params == {"total_num_steps": 1000, "warmup_num_steps": 30, "warmup_max_lr": 1e-4, "warmup_min_lr": 0}


def test_disagreeing_explicit_values_are_refused_like_the_trainer_does():
    raw = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}}}
    with pytest.raises(ConfigError) as err:
        resolve_auto(raw, **TRAINER)
    message = str(err.value)
    for fragment in ("train_micro_batch_size_per_gpu=8 vs the trainer's per_device_train_batch_size=4",
                     "gradient_clipping=1.0 vs the trainer's max_grad_norm=0.5",
                     "optimizer.params.lr=0.001 vs the trainer's learning_rate=3e-05",
                     "optimizer.params.betas=[0.9, 0.999] vs the trainer's [adam_beta1, adam_beta2]=[0.9, 0.95]",
                     'Set these config values to "auto"'):
        assert fragment in message
    assert resolve_auto(raw, check=False, **TRAINER)["train_micro_batch_size_per_gpu"] == 8


def test_agreeing_explicit_values_pass():
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
           "gradient_clipping": 0.5}
    assert resolve_auto(raw, **TRAINER) == raw


def test_a_config_without_batch_gets_the_trainers():
    used = resolve_auto({"zero_optimization": {"stage": 3}}, **TRAINER)
    assert (used["train_batch_size"], used["train_micro_batch_size_per_gpu"], used["gradient_accumulation_steps"]) == (
        16, 4, 2)


def test_a_config_with_part_of_the_batch_keeps_it():
    used = resolve_auto({"train_batch_size": 64}, check=False, **TRAINER)
    assert used == {"train_batch_size": 64}
    assert parse_config(used, data_parallel_size=2).batch.micro_batch_size == 32


def test_unknown_trainer_values_leave_auto_to_the_defaults():
    used = resolve_auto({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                         "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}})
    config = parse_config(used, data_parallel_size=1)
    assert config.optimizer.params["lr"] == "auto"
    assert config.section("zero_optimization").reduce_bucket_size == 500_000_000  # DeepSpeed's default


def test_auto_left_where_a_number_is_needed_fails_naming_it():
    with pytest.raises(ConfigError, match=r"total_num_steps is 'auto' but nothing resolved it: pass the trainer's "
                                          r"values to ds_core.config.resolve_auto\(\)"):
        parse_config({"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR",
                                                           "params": {"total_num_steps": "auto"}}})
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 'auto' and nothing resolved it: a number "
                                          r"is needed to build the batch"):
        parse_config({"train_micro_batch_size_per_gpu": "auto"}, data_parallel_size=2)


def test_accepts_a_path_and_a_json_string(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    assert resolve_auto(path, per_device_train_batch_size=3)["train_micro_batch_size_per_gpu"] == 3
    assert resolve_auto('{"gradient_clipping": "auto"}', max_grad_norm=2.0) == {"gradient_clipping": 2.0}
