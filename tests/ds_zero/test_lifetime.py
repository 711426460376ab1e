"""Dropped ZeRO engines are freed (stages 1-3): gradient hooks hold their reducer weakly."""

import pytest

from tests.ds_core.test_engine_lifetime import engine_is_freed


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dropped_zero_engine_is_freed(stage):
    engine_is_freed({"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                     "zero_optimization": {"stage": stage}})
