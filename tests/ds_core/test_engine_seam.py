"""The feature seam: a feature's components replace the engine's defaults when its section is used."""

import pytest
import torch

import ds_core
from ds_core import plugins
from ds_core.config import Section
from ds_core.engine.reducer import DataParallelReducer
from ds_core.errors import ConfigError

CALLS = []


class FakeSection(Section):
    level: int = 1


class Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


def wrap_model(engine, module):
    CALLS.append(("model_wrapper", engine.config.section("fake_feature").level))
    return Wrapped(module)


def keep_default_reducer(engine):
    CALLS.append(("gradient_reducer", None))
    return None


class RecordingLayout:
    def save(self, engine, save_dir, tag, client_state):
        CALLS.append(("save", tag))
        return save_dir

    def load(self, engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        return load_dir, {}


def make_layout(engine):
    return RecordingLayout()


def _spec(name, section, components):
    return plugins.FeatureSpec(name=name, module="x", dist=f"ds-{name}", config_section=section,
                               config_model=f"{__name__}:FakeSection",
                               components={k: f"{__name__}:{v}" for k, v in components.items()})


CONFIG = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 0,
          "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "fake_feature": {"level": 3}}


def test_components_replace_defaults(monkeypatch, tmp_path):
    spec = _spec("fake", "fake_feature", {"model_wrapper": "wrap_model", "gradient_reducer": "keep_default_reducer",
                                          "checkpoint_layout": "make_layout"})
    monkeypatch.setattr(plugins, "feature_for_section", lambda s: spec if s == "fake_feature" else None)
    CALLS.clear()
    engine, *_ = ds_core.initialize(model=torch.nn.Linear(2, 1), config=CONFIG)
    assert isinstance(engine.module, Wrapped)
    assert isinstance(engine.reducer, DataParallelReducer)  # factory returned None: default kept
    engine.save_checkpoint(tmp_path, tag="t")
    assert CALLS == [("model_wrapper", 3), ("gradient_reducer", None), ("save", "t")]


def test_two_features_same_component_is_an_error(monkeypatch):
    a = _spec("a", "fake_feature", {"model_wrapper": "wrap_model"})
    b = _spec("b", "other_feature", {"model_wrapper": "wrap_model"})
    monkeypatch.setattr(plugins, "feature_for_section",
                        lambda s: {"fake_feature": a, "other_feature": b}.get(s))
    config = dict(CONFIG, other_feature={})
    with pytest.raises(ConfigError, match="features 'a' and 'b' both provide 'model_wrapper'"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=config)


def test_unknown_component_kind(monkeypatch):
    spec = _spec("fake", "fake_feature", {"teleporter": "wrap_model"})
    monkeypatch.setattr(plugins, "feature_for_section", lambda s: spec if s == "fake_feature" else None)
    with pytest.raises(ConfigError, match="declares component 'teleporter'"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=CONFIG)
