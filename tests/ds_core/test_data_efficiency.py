"""Curriculum learning by sequence length: the schedules against their formulas, the config forms and their
errors, and a 2-rank training whose model really receives the scheduled lengths."""

import math

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.config import parse_config
from ds_core.data_efficiency import DifficultySchedule
from ds_core.errors import ConfigError
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens


def _legacy(schedule_type="fixed_linear", lo=8, hi=32, **schedule_config):
    return {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": lo, "max_difficulty": hi,
            "schedule_type": schedule_type, "schedule_config": schedule_config}


def _config(**sections):
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0, "seed": 5,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, **sections}


# -- the schedules -----------------------------------------------------------------------------------------
def test_fixed_linear_follows_its_formula_rounded_down_to_the_step():
    s = parse_config(_config(curriculum_learning=_legacy(
        "fixed_linear", 8, 64, total_curriculum_step=10, difficulty_step=8))).curriculum_learning.schedule()
    for t in range(0, 15):
        raw = math.floor(min(t / 10, 1.0) * 56 + 8)
        assert s.value(t) == min(raw - raw % 8, 64), t
    assert [s.value(t) for t in (0, 1, 2, 5, 10, 11)] == [8, 8, 16, 32, 64, 64]


def test_a_maximum_off_the_step_grid_is_reached_after_the_total_steps():
    s = DifficultySchedule("cl", 32, 197, "fixed_linear", {"total_curriculum_step": 10, "difficulty_step": 8})
    assert [s.value(t) for t in (0, 5, 10, 11)] == [32, 112, 192, 197]  # 197 = ViT's 14 x 14 patches + 1


def test_fixed_root_follows_its_formula():
    s = DifficultySchedule("cl", 8, 64, "fixed_root", {"total_curriculum_step": 16, "difficulty_step": 4,
                                                         "root_degree": 2})
    for t in range(0, 20):
        raw = math.floor(min(t / 16, 1.0) ** 0.5 * 56 + 8)
        assert s.value(t) == min(raw - raw % 4, 64), t
    assert s.value(4) == 36  # sqrt(1/4) * 56 + 8 = 36: a square root grows early, unlike the linear 20


def test_fixed_discrete_holds_each_difficulty_up_to_its_max_step():
    s = DifficultySchedule("cl", None, None, "fixed_discrete", {"difficulty": [8, 16, 32], "max_step": [3, 6]})
    assert [s.value(t) for t in range(0, 10)] == [8, 8, 8, 8, 16, 16, 16, 32, 32, 32]
    assert (s.min_value, s.max_value) == (8, 32)


@pytest.mark.parametrize("section, message", [
    (_legacy("fixed_linear", 5, 64, total_curriculum_step=10, difficulty_step=8),
     "difficulty_step 8 does not divide min_difficulty 5"),
    (_legacy("fixed_cubic", total_curriculum_step=10, difficulty_step=8),
     "schedule_type 'fixed_cubic' is not a schedule ds knows; use one of 'fixed_linear'"),
    (_legacy("fixed_root", total_curriculum_step=10, difficulty_step=8),
     "needs 'root_degree' for schedule_type 'fixed_root'"),
    (_legacy("fixed_discrete", difficulty=[8, 16], max_step=[2, 4]), "one more difficulty than max_step"),
    ({**_legacy(total_curriculum_step=10, difficulty_step=8), "curriculum_type": "vocab"},
     "curriculum_type 'vocab' is not supported"),
    (_legacy("fixed_linear", 64, 8, total_curriculum_step=10, difficulty_step=8), "max_difficulty 8 < min_difficulty 64"),
])
def test_bad_legacy_curriculum_is_refused_naming_the_value(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config(_config(curriculum_learning=section))


def test_disabled_sections_are_accepted_as_given():
    cfg = parse_config(_config(curriculum_learning={**_legacy("nonsense"), "enabled": False},
                               data_efficiency={"enabled": False}))
    assert cfg.curriculum_learning.enabled is False


def _newer(metric="seqlen_truncate", **overrides):
    body = {"difficulty_type": "value", "clustering_type": "single_cluster", "min_difficulty": 8,
            "max_difficulty": 32, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 8}, **overrides}
    return {"enabled": True, "seed": 3, "data_sampling": {"enabled": True, "num_workers": 0, "curriculum_learning": {
        "enabled": True, "curriculum_metrics": {metric: body}}}}


def test_newer_form_seqlen_metric_gives_the_same_schedule():
    s = parse_config(_config(data_efficiency=_newer())).data_efficiency.curriculum_schedule()
    assert [s.value(t) for t in range(8)] == [8, 8, 16, 16, 24, 24, 32, 32]


@pytest.mark.parametrize("data_efficiency, message", [
    (_newer(clustering_type="schedule_based"), "clustering_type 'schedule_based' is not supported"),
    (_newer(difficulty_type="percentile"), "difficulty_type 'percentile' is not supported"),
    (_newer("vocabularyrarity"), "need DeepSpeed's offline data analysis index"),
    (_newer(schedule_type="fixed_foo"), "schedule_type 'fixed_foo' is not a schedule"),
])
def test_newer_form_parts_needing_an_offline_index_are_refused_by_name(data_efficiency, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(data_efficiency=data_efficiency))


def test_both_curriculum_forms_at_once_are_refused():
    cfg = _config(curriculum_learning=_legacy(total_curriculum_step=4, difficulty_step=8),
                  data_efficiency=_newer())
    with pytest.raises(ConfigError, match="both enabled"):
        ds_core.initialize(model=GPT(GPTConfig(seq_len=32, dim=32, layers=2, heads=2)), config=cfg)


# -- the engine ------------------------------------------------------------------------------------------
class RecordingGPT(GPT):
    """Records the sequence length of every batch it receives."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seen = []

    def forward(self, tokens, targets=None):
        self.seen.append((tokens.shape[1], None if targets is None else targets.shape[1]))
        return super().forward(tokens, targets)


class SeqlenGPT(GPT):
    """DeepSpeed's contract: the model takes curriculum_seqlen and truncates itself."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.asked = []

    def forward(self, tokens, targets=None, curriculum_seqlen=None):
        self.asked.append(curriculum_seqlen)
        if curriculum_seqlen is not None:
            tokens, targets = tokens[:, :curriculum_seqlen], targets[:, :curriculum_seqlen]
        return super().forward(tokens, targets)


TINY = GPTConfig(vocab_size=64, seq_len=32, dim=32, layers=2, heads=2)


@pytest.mark.world_size(2)
def test_two_rank_training_sees_the_scheduled_lengths():
    torch.manual_seed(0)
    model = RecordingGPT(TINY)
    engine, *_ = ds_core.initialize(model=model, config=_config(
        gradient_accumulation_steps=1, train_batch_size=4,
        curriculum_learning=_legacy("fixed_linear", 8, 32, total_curriculum_step=6, difficulty_step=8)))
    rank = dist.get_rank()
    expected = []
    for step in range(8):
        x, y = synthetic_tokens(2, 32, 64, step, rank)
        loss = engine(x, y)
        expected.append(min(32, max(8, (math.floor((step + 1) / 6 * 24 + 8) // 8) * 8)))
        assert engine.curriculum_seqlen() == expected[-1]
        engine.backward(loss)
        engine.step()
    assert model.seen == [(d, d) for d in expected]
    assert expected == [8, 16, 16, 24, 24, 32, 32, 32]
    # every rank trained the same lengths and kept identical weights
    w = engine.module.blocks[0].qkv.weight.detach().clone()
    other = [torch.empty_like(w) for _ in range(2)]
    dist.all_gather(other, w)
    assert torch.equal(other[0], other[1])
    # evaluation sees the full length
    engine.eval()
    with torch.no_grad():
        engine(*synthetic_tokens(2, 32, 64, 0, rank))
    assert model.seen[-1] == (32, 32)


@pytest.mark.world_size(2)
def test_a_model_taking_curriculum_seqlen_receives_it_and_the_batch_is_left_whole():
    model = SeqlenGPT(TINY)
    engine, *_ = ds_core.initialize(model=model, config=_config(
        data_efficiency=_newer(schedule_config={"total_curriculum_step": 4, "difficulty_step": 8})))
    for step in range(3):
        engine.backward(engine(*synthetic_tokens(2, 32, 64, step, dist.get_rank())))
        engine.step()
    assert model.asked == [8, 16, 24]  # d(global_steps + 1): floor(t / 4 * 24 + 8) rounded down to 8


@pytest.mark.world_size(2)
def test_max_difficulty_longer_than_the_data_fails_on_every_rank():
    engine, *_ = ds_core.initialize(model=RecordingGPT(TINY), config=_config(
        curriculum_learning=_legacy("fixed_linear", 8, 32, total_curriculum_step=6, difficulty_step=8)))
    length = 32 if dist.get_rank() == 0 else 16  # only rank 1's data is too short; rank 0 must not hang
    with pytest.raises(ConfigError, match=r"curriculum_learning.max_difficulty 32 exceeds the data's sequence "
                                          r"length 16"):
        engine(*synthetic_tokens(2, length, 64, 0, dist.get_rank()))


@pytest.mark.world_size(2)
def test_a_pipeline_with_a_curriculum_is_refused_on_every_rank():
    ds_pipe = pytest.importorskip("ds_pipe")
    topo = ds_core.comm.Topology(dist.get_world_size(), pipe=2)
    model = ds_pipe.PipelineModule([ds_pipe.LayerSpec(torch.nn.Linear, 4, 4)] * 2, topology=topo,
                                   loss_fn=torch.nn.functional.mse_loss, partition_method="uniform")
    with pytest.raises(ConfigError, match="which a pipeline's schedule does not call"):
        ds_core.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 0,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            "curriculum_learning": _legacy(total_curriculum_step=4, difficulty_step=8)})
