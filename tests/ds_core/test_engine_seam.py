"""The feature seam: model transforms, one data-parallel strategy, engine hooks, the engine as a module."""

import pytest
import torch

import ds_core
from ds_core import plugins
from ds_core.config import Section
from ds_core.engine import Engine, StepInfo
from ds_core.engine.context import ModelContext
from ds_core.engine.replicated import ReplicatedStrategy
from ds_core.errors import ConfigError

CALLS = []


class FakeSection(Section):
    level: int = 1


class Wrapped(torch.nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x):
        return self.inner(x) * self.factor


def wrap_model(ctx, module):
    assert isinstance(ctx, ModelContext) and not isinstance(ctx, Engine)
    CALLS.append(("model_wrapper", ctx.section.level, ctx.precision.name, ctx.topology.world_size, ctx.strategy))
    return Wrapped(module, 2)


def wrap_first(ctx, module):
    CALLS.append(("first", type(module).__name__))
    return Wrapped(module, 3)


wrap_first.order = 10  # runs before wrap_model (order 100)


def keep_default(section):
    CALLS.append(("data_parallel_strategy", section.level))
    return None


class RecordingStrategy(ReplicatedStrategy):
    """Stage 0, recording what the engine calls."""

    name = "recording"

    def prepare(self, ctx):
        CALLS.append(("prepare", ctx.section.level, len(ctx.params)))
        super().prepare(ctx)

    def step(self, coef):
        CALLS.append(("step", round(coef, 6)))
        return super().step(coef)


def recording(section):
    return RecordingStrategy()


class Incomplete:
    layout = "incomplete"

    def prepare(self, ctx):
        pass

    def step(self, coef):
        return True


def incomplete(section):
    return Incomplete()


def _spec(name, section, components):
    return plugins.FeatureSpec(name=name, module="x", dist=f"ds-{name}", config_section=section,
                               config_model=f"{__name__}:FakeSection",
                               components={k: f"{__name__}:{v}" for k, v in components.items()})


BASE = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 0, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
CONFIG = {**BASE, "fake_feature": {"level": 3}}


def _features(monkeypatch, *specs):
    by_section = {s.config_section: s for s in specs}
    monkeypatch.setattr(plugins, "feature_for_section", lambda s: by_section.get(s))


def test_transforms_get_a_context_and_run_in_order(monkeypatch):
    _features(monkeypatch, _spec("fake", "fake_feature", {"model_wrapper": "wrap_model",
                                                         "data_parallel_strategy": "keep_default"}),
              _spec("first", "other_feature", {"model_wrapper": "wrap_first"}))
    CALLS.clear()
    engine, *_ = ds_core.initialize(model=torch.nn.Linear(2, 1), config=dict(CONFIG, other_feature={}))
    assert isinstance(engine.module, Wrapped) and engine.module.factor == 2 and engine.module.inner.factor == 3
    assert isinstance(engine.strategy, ReplicatedStrategy)  # the factory returned None: stage 0 kept
    # the strategy is built (not prepared) first, so transforms see its layout; prepared after them
    assert CALLS == [("data_parallel_strategy", 3), ("first", "Linear"), ("model_wrapper", 3, "fp32", 1, "replicated")]


def test_a_feature_strategy_replaces_stage_0_and_gets_the_step_coefficient(monkeypatch):
    _features(monkeypatch, _spec("fake", "fake_feature", {"data_parallel_strategy": "recording"}))
    CALLS.clear()
    engine, optimizer, *_ = ds_core.initialize(model=torch.nn.Linear(2, 1), config=dict(CONFIG, gradient_clipping=0.5))
    assert optimizer is engine.strategy and isinstance(engine.strategy, RecordingStrategy)
    x = torch.ones(1, 2)
    engine.backward(engine(x).sum() * 10)
    engine.step()
    norm = engine.get_global_grad_norm()
    assert CALLS == [("prepare", 3, 2), ("step", round(0.5 / (norm + 1e-6), 6))]


def test_a_strategy_missing_methods_is_named_at_initialize(monkeypatch):
    _features(monkeypatch, _spec("fake", "fake_feature", {"data_parallel_strategy": "incomplete"}))
    with pytest.raises(ConfigError, match=r"strategy from feature 'fake' .* does not implement DataParallelStrategy: "
                                          r"missing begin_backward\(\), end_backward\(\), grad_norm_terms\(\), "
                                          r"zero_grad\(\), sync_from_module\(\), module_keys\(\), save\(\), load\(\), "
                                          r"close\(\)"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=CONFIG)


def test_two_features_same_strategy_is_an_error(monkeypatch):
    _features(monkeypatch, _spec("a", "fake_feature", {"data_parallel_strategy": "recording"}),
              _spec("b", "other_feature", {"data_parallel_strategy": "recording"}))
    with pytest.raises(ConfigError, match="features 'a' and 'b' both provide 'data_parallel_strategy'"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=dict(CONFIG, other_feature={}))


@pytest.mark.parametrize("kind", ["gradient_reducer", "optimizer_wrapper", "checkpoint_layout"])
def test_retired_component_kinds_name_their_replacement(monkeypatch, kind):
    _features(monkeypatch, _spec("fake", "fake_feature", {kind: "keep_default"}))
    with pytest.raises(ConfigError, match=f"declares component '{kind}', which the engine no longer has: provide "
                                          f"a data_parallel_strategy"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=CONFIG)


def test_unknown_component_kind(monkeypatch):
    _features(monkeypatch, _spec("fake", "fake_feature", {"teleporter": "wrap_model"}))
    with pytest.raises(ConfigError, match="declares component 'teleporter'"):
        ds_core.initialize(model=torch.nn.Linear(2, 1), config=CONFIG)


def test_hooks_fire_in_order_with_the_step_count():
    engine, *_ = ds_core.initialize(model=torch.nn.Linear(2, 1), config=dict(
        BASE, gradient_accumulation_steps=2))
    seen = []
    for event in ("forward_start", "backward_start", "backward_end", "before_step"):
        engine.hooks.subscribe(event, lambda *args, e=event: seen.append((e, *args)))
    engine.hooks.subscribe("after_step", lambda info: seen.append(("after_step", info)))
    handle = engine.hooks.subscribe("grad_norm", lambda sq: sq * 4)  # e.g. a second, equal shard
    for _ in range(2):
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()
    info = seen[-1][1]
    assert [s[0] for s in seen] == ["forward_start", "backward_start", "backward_end"] * 2 + ["before_step",
                                                                                            "after_step"]
    assert [s[1] for s in seen if s[0] == "backward_start"] == [False, True]  # only the boundary reduces
    assert isinstance(info, StepInfo) and info.global_steps == 1 and info.applied and info.lr == 0.1
    assert info.grad_norm == pytest.approx(2 * 3 ** 0.5)  # gradient (1, 1, 1); the hook doubles the norm
    handle.remove()
    with pytest.raises(ds_core.errors.DSError, match="unknown engine hook 'on_step'"):
        engine.hooks.subscribe("on_step", print)


def test_the_engine_is_a_module_wrapping_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.5))
    engine, *_ = ds_core.initialize(model=model, config=BASE)
    assert isinstance(engine, torch.nn.Module) and engine.module is model
    assert [n for n, _ in engine.named_parameters()] == ["module.0.weight", "module.0.bias"]
    assert list(engine.parameters()) == list(model.parameters())
    assert set(engine.state_dict()) == {"module.0.weight", "module.0.bias"}
    engine.eval()
    assert not model.training and not engine.training
    engine.train()
    assert model[1].training
    assert engine.to(torch.float32) is engine
    # loading weights through the engine moves what the optimizer steps too (no stale masters)
    new = {k: torch.full_like(v, 0.25) for k, v in engine.state_dict().items()}
    engine.load_state_dict(new)
    assert torch.equal(model[0].weight, torch.full((3, 2), 0.25))


def test_loading_weights_into_a_bf16_engine_moves_the_masters():
    model = torch.nn.Linear(2, 1)
    engine, *_ = ds_core.initialize(model=model, config=dict(BASE, bf16={"enabled": True},
                                                             optimizer={"type": "SGD", "params": {"lr": 0.0}}))
    engine.load_state_dict({"module.weight": torch.full((1, 2), 3.0), "module.bias": torch.zeros(1)})
    engine.backward(engine(torch.ones(1, 2)).sum())
    engine.step()  # lr 0: the weights stay what was loaded, not the masters of the old weights
    assert torch.equal(model.weight.float(), torch.full((1, 2), 3.0))
