"""No silent no-ops: a key that is accepted but has no effect in ds gives exactly one warning naming it.

The keys below used to validate and do nothing without a word; each now warns once when its value
asks for something ds does not do, and says nothing at the value that matches what ds does.
"""

import warnings

import pytest

from ds_core.config import ConfigWarning, parse_config

ASKING = {
    "train_batch_size": 8,
    "checkpoint": {"tag_validation": "Fail", "use_node_local_storage": True, "parallel_write": {"pipeline_stage": True},
                   "checkpoint_serialization": False},
    "fp16": {"enabled": True, "auto_cast": False},
    "zero_optimization": {"stage": 3, "stage3_model_persistence_threshold": 1_000_000,
                          "offload_optimizer": {"device": "cpu", "pipeline_read": True, "pipeline_write": True,
                                                "fast_init": True}},
    "comms_logger": {"enabled": True, "debug": True},
    "dataloader_drop_last": False,
}
WARNED = ["checkpoint.tag_validation", "checkpoint.use_node_local_storage", "checkpoint.parallel_write.pipeline_stage",
          "checkpoint.checkpoint_serialization", "fp16.auto_cast", "zero_optimization.stage3_model_persistence_threshold",
          "zero_optimization.offload_optimizer.pipeline_read", "zero_optimization.offload_optimizer.pipeline_write",
          "zero_optimization.offload_optimizer.fast_init", "comms_logger.debug",
          "dataloader_drop_last"]


def _notes(config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_config(config)
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def test_each_key_without_effect_warns_exactly_once_naming_it():
    notes = _notes(ASKING)
    for key in WARNED:
        named = [n for n in notes if f"DeepSpeed key {key!r} is accepted but has no effect in ds" in n]
        assert len(named) == 1, (key, notes)
    assert len(notes) == len(WARNED)
    assert all("remove it to silence this warning" in n for n in notes)


def test_values_that_match_what_ds_does_are_silent():
    quiet = {"train_batch_size": 8, "fp16": {"enabled": True, "auto_cast": True},
             "bf16": {"enabled": False, "immediate_grad_update": True},
             "checkpoint": {"tag_validation": "Ignore", "load_universal": True, "use_node_local_storage": False,
                            "parallel_write": {"pipeline_stage": False}},
             "zero_optimization": {"stage": 3, "contiguous_gradients": True, "offload_optimizer": {
                 "device": "cpu", "pipeline_read": False, "pipeline_write": False, "fast_init": False}},
             "flops_profiler": {"enabled": False, "profile_step": 5}, "dataloader_drop_last": True}
    assert _notes(quiet) == []


def test_load_universal_has_its_effect():
    """ds checkpoints load at any world size, which is what load_universal asks for: no warning."""
    assert _notes({"train_batch_size": 8, "checkpoint": {"load_universal": True}}) == []


def test_immediate_grad_update_false_warns():
    notes = _notes({"train_batch_size": 8, "bf16": {"enabled": True, "immediate_grad_update": False}})
    assert len(notes) == 1 and "'bf16.immediate_grad_update'" in notes[0] and "fp32 gradient buffer" in notes[0]


def test_only_rank_0_warns(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert _notes(ASKING) == []
    monkeypatch.setenv("RANK", "0")
    assert len(_notes(ASKING)) == len(WARNED)


@pytest.mark.parametrize("section", ["autotuning", "nebula", "hybrid_engine", "comet", "eigenvalue"])
def test_disabled_sections_are_silent(section):
    assert _notes({"train_batch_size": 8, section: {"enabled": False}}) == []
