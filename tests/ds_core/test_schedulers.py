"""DeepSpeed's lr schedules: values at chosen steps against hand-computed numbers, config errors, checkpoints.

Convention under test (DeepSpeed's): ``last_batch_iteration`` i starts at -1; the lr set after
``step()`` has made it i is the lr of optimizer step i + 1. Expected values below are worked out by
hand from each schedule's formula (written next to them) and compared at 1e-12.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ds_core.config import SchedulerConfig, parse_config
from ds_core.engine.schedulers import (
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
    scheduler_params,
)
from ds_core.errors import ConfigError


def optimizer(kind="adamw", lrs=(0.5,)):
    groups = [{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in lrs]
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.5)
    return torch.optim.Adagrad(groups)


def build(type_, opt=None, **params):
    return build_scheduler(SchedulerConfig(type=type_, params=params), opt if opt is not None else optimizer())


def lrs_at(scheduler, iterations):
    """The optimizer's lr (group 0) after stepping the scheduler to each iteration, in order."""
    seen = {}
    for i in range(-1, max(iterations) + 1):
        if i >= 0:
            scheduler.step()
        assert scheduler.last_batch_iteration == i
        seen[i] = scheduler.optimizer.param_groups[0]["lr"]
    return [seen[i] for i in iterations]


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-12)


# --- WarmupLR ------------------------------------------------------------------------------------

def test_warmup_log():
    # lr = 0.1 * ln(i + 1) / ln(10) = 0.1 * log10(i + 1); log10(4) = 0.60205999132796
    s = build("WarmupLR", warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10)
    assert lrs_at(s, [-1, 0, 3, 9, 10, 50]) == approx([0.0, 0.0, 0.060205999132796, 0.1, 0.1, 0.1])


def test_warmup_linear():
    # lr = 0.01 + 0.1 * i / 10, then 0.11
    s = build("WarmupLR", warmup_min_lr=0.01, warmup_max_lr=0.11, warmup_num_steps=10, warmup_type="linear")
    assert lrs_at(s, [-1, 0, 5, 9, 10, 11]) == approx([0.01, 0.01, 0.06, 0.1, 0.11, 0.11])


def test_warmup_defaults_auto_and_per_group_values():
    # warmup_max_lr defaults to each group's own lr; "auto" means the default
    opt = optimizer(lrs=(0.4, 0.2))
    s = build("WarmupLR", opt, warmup_max_lr="auto", warmup_num_steps=4, warmup_type="linear")
    s.step(1)  # jump: i = 1 -> 1/4 of the way
    assert [g["lr"] for g in opt.param_groups] == approx([0.1, 0.05])
    opt = optimizer(lrs=(0.4, 0.2))
    s = build("WarmupLR", opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.3],
              warmup_num_steps=4, warmup_type="linear")
    s.step(2)
    assert s.get_last_lr() == approx([0.5, 0.2])
    assert build("WarmupLR", warmup_num_steps=1).warmup_num_steps == 2  # DeepSpeed's floor (ln 1 = 0)


# --- WarmupDecayLR -------------------------------------------------------------------------------

def test_warmup_decay_linear_end_point():
    # N = 4, T = 12: warmup i/4, then (12 - i) / 8, 0 from i = 12 on
    s = build("WarmupDecayLR", total_num_steps=12, warmup_max_lr=1.0, warmup_num_steps=4, warmup_type="linear")
    assert lrs_at(s, [-1, 2, 4, 8, 11, 12, 20]) == approx([0.0, 0.5, 1.0, 0.5, 0.125, 0.0, 0.0])


def test_warmup_decay_log_and_min_lr_floor():
    # log warmup over 4: ln(2)/ln(4) = 0.5 at i = 1; decay ends at warmup_min_lr
    s = build("WarmupDecayLR", total_num_steps=8, warmup_min_lr=0.2, warmup_max_lr=1.0, warmup_num_steps=4)
    # i=1: 0.2 + 0.8*0.5; i=6: 0.2 + 0.8*(8-6)/4; i=8: 0.2
    assert lrs_at(s, [1, 3, 6, 8, 9]) == approx([0.6, 1.0, 0.6, 0.2, 0.2])


def test_warmup_decay_needs_total_num_steps():
    with pytest.raises(ConfigError, match=r"WarmupDecayLR needs total_num_steps \(the number of optimizer steps"):
        build("WarmupDecayLR", warmup_num_steps=10)
    with pytest.raises(ConfigError, match="needs total_num_steps"):
        build("WarmupDecayLR", total_num_steps="auto")
    s = build_scheduler(SchedulerConfig(type="WarmupDecayLR", params={"total_num_steps": "auto"}), optimizer(),
                        auto={"total_num_steps": 5000})
    assert s.total_num_steps == 5000
    with pytest.warns(UserWarning, match="total_num_steps 5 < warmup_num_steps 10"):
        build("WarmupDecayLR", total_num_steps=5, warmup_num_steps=10)


# --- WarmupCosineLR ------------------------------------------------------------------------------

def test_warmup_cosine_warmup_cosine_and_floor():
    # base 0.5, N = 4 linear, T = 12, warmup_min_ratio 0.2, cos_min_ratio 0.1
    # warmup: r = 0.2 + 0.8 * i/4; cosine: r = 0.1 + 0.9 * (1 + cos(pi * (i - 3)/8)) / 2
    #   i=4: cos(pi/8) = 0.92387953251129 -> r = 0.96574578962998 -> lr 0.48287289481499
    #   i=7: cos(pi/2) = 0 -> r = 0.55 -> 0.275; i=11: r = 0.1 -> 0.05 (floor), held afterwards
    s = build("WarmupCosineLR", total_num_steps=12, warmup_num_steps=4, warmup_type="linear",
              warmup_min_ratio=0.2, cos_min_ratio=0.1)
    assert lrs_at(s, [-1, 0, 2, 4, 7, 11, 12, 30]) == approx(
        [0.1, 0.1, 0.3, 0.48287289481499, 0.275, 0.05, 0.05, 0.05])


def test_warmup_cosine_log_warmup_and_groups():
    # log warmup over 10: r = log10(i + 1); groups scale by their own base lr
    opt = optimizer(lrs=(1.0, 0.1))
    s = build("WarmupCosineLR", opt, total_num_steps=100, warmup_num_steps=10)
    s.step(3)
    assert s.get_last_lr() == approx([0.60205999132796, 0.060205999132796])
    assert build("WarmupCosineLR", total_num_steps=10, warmup_num_steps=5).cos_min_ratio == 0.0001  # DeepSpeed's default


def test_warmup_cosine_bad_ratio():
    with pytest.raises(ConfigError, match=r"cos_min_ratio 1.5 must lie in \[0, 1\]"):
        build("WarmupCosineLR", total_num_steps=10, cos_min_ratio=1.5)


# --- OneCycle ------------------------------------------------------------------------------------

def test_one_cycle_both_phases_decay_and_momentum():
    # C = 8 (4 + 4), s1 = 0.5, x = frac((i+1)/8); lr = 0.1 + 0.9 h, beta1 = 0.9 - 0.1 h
    # h: i=-1 -> 0; i=1 -> x=.25 -> .5; i=3 -> x=.5 -> 1; i=5 -> x=.75 -> .5; i=7 -> x=0 -> 0
    # decay (step size 2, rates 0.5 / 0.05), d = i - 7: i=8 -> lr .1/1.25 = .08, beta1 .9*1.025 = .9225
    #   i=11 -> d=4 -> lr .1/2 = .05, beta1 .9*1.1 = .99
    opt = optimizer("adamw")
    s = build("OneCycle", opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4,
              cycle_min_mom=0.8, cycle_max_mom=0.9, decay_step_size=2, decay_lr_rate=0.5, decay_mom_rate=0.05)
    points = [-1, 1, 3, 5, 7, 8, 11]
    expected_lr = [0.1, 0.55, 1.0, 0.55, 0.1, 0.08, 0.05]
    expected_mom = [0.9, 0.85, 0.8, 0.85, 0.9, 0.9225, 0.99]
    for i, lr, mom in zip(points, expected_lr, expected_mom):
        s.step(i)
        assert opt.param_groups[0]["lr"] == approx(lr)
        assert opt.param_groups[0]["betas"][0] == approx(mom)
        assert opt.param_groups[0]["betas"][1] == 0.95  # the group's beta2 is kept


def test_one_cycle_uneven_phases_and_no_decay():
    # first 2, second 6: s1 = .25; i=0: x=1/8 -> h=.5; i=1: h=1; i=4: x=5/8 -> h=(3/8)/(3/4)=.5
    s = build("OneCycle", cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=2, cycle_second_step_size=6)
    # decay_step_size 0: after the cycle the lr stays at cycle_min_lr
    assert lrs_at(s, [0, 1, 4, 7, 8, 100]) == approx([0.5, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_one_cycle_stairs():
    # 2 stairs per phase (C = 8): first phase h = floor(2h)/2, second phase 1 - floor(2(1-h))/2
    s = build("OneCycle", cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4, cycle_first_stair_count=2)
    assert lrs_at(s, list(range(8))) == approx([0.1, 0.55, 0.55, 1.0, 1.0, 0.55, 0.55, 0.1])


def test_one_cycle_sgd_momentum_and_optimizers_without_momentum():
    opt = optimizer("sgd")
    s = build("OneCycle", opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4)
    s.step(3)
    assert opt.param_groups[0]["momentum"] == approx(0.8)
    with pytest.warns(UserWarning, match="cycle_momentum is turned off because Adagrad"):
        s = build("OneCycle", optimizer("adagrad"), cycle_min_lr=0.1, cycle_max_lr=1.0)
    assert not s.cycle_momentum
    opt = optimizer("adamw")
    build("OneCycle", opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_momentum=False)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_one_cycle_needs_its_bounds():
    with pytest.raises(ConfigError, match=r"OneCycle needs cycle_min_lr .*; cycle_max_lr"):
        build("OneCycle")


# --- LRRangeTest ---------------------------------------------------------------------------------

def test_lr_range_test_continuous():
    # lr = 0.01 * (1 + 2 * (i + 1) / 4)
    s = build("LRRangeTest", lr_range_test_min_lr=0.01, lr_range_test_step_size=4, lr_range_test_step_rate=2)
    assert lrs_at(s, [-1, 0, 3, 5]) == approx([0.01, 0.015, 0.03, 0.04])


def test_lr_range_test_staircase():
    # lr = 0.01 * (1 + 2 * floor((i + 1) / 4))
    s = build("LRRangeTest", lr_range_test_min_lr=0.01, lr_range_test_step_size=4, lr_range_test_step_rate=2,
              lr_range_test_staircase=True)
    assert lrs_at(s, [-1, 0, 2, 3, 6, 7]) == approx([0.01, 0.01, 0.01, 0.03, 0.03, 0.05])


def test_lr_range_test_defaults():
    s = build("LRRangeTest")
    assert (s.min_lrs, s.step_size, s.step_rate, s.staircase) == ([1e-3], 2000, 1.0, False)


# --- checkpoints ---------------------------------------------------------------------------------

ALL = [
    ("WarmupLR", {"warmup_num_steps": 5}),
    ("WarmupDecayLR", {"total_num_steps": 20, "warmup_num_steps": 5, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 20, "warmup_num_steps": 5}),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 3,
                  "decay_step_size": 2, "decay_lr_rate": 0.1}),
    ("LRRangeTest", {"lr_range_test_step_size": 3}),
]


@pytest.mark.parametrize("type_, params", ALL)
def test_state_dict_round_trip_through_json(type_, params):
    s = build(type_, optimizer(lrs=(0.5, 0.05)), **params)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler)
    for _ in range(7):
        s.step()
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"last_batch_iteration": 6, "base_lrs": [0.5, 0.05]}

    opt2 = optimizer(lrs=(0.5, 0.05))
    s2 = build(type_, opt2, **params)
    s2.load_state_dict(state)
    assert s2.last_epoch == 6 and s2.get_last_lr() == s.get_last_lr()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in s.optimizer.param_groups]
    for _ in range(10):
        s.step()
        s2.step()
        assert s2.get_last_lr() == s.get_last_lr()


def test_warmup_cosine_restores_base_lrs_and_deepspeed_state():
    s = build("WarmupCosineLR", optimizer(lrs=(0.5,)), total_num_steps=20, warmup_num_steps=5)
    s.step(9)
    opt2 = optimizer(lrs=(0.7,))  # an optimizer whose lr has since changed: the saved base lr wins
    s2 = build("WarmupCosineLR", opt2, total_num_steps=20, warmup_num_steps=5)
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr()
    s3 = build("WarmupCosineLR", optimizer(lrs=(0.5,)), total_num_steps=20, warmup_num_steps=5)
    s3.load_state_dict({"last_batch_iteration": 9})  # DeepSpeed's own format
    assert s3.get_last_lr() == s.get_last_lr()
    with pytest.raises(ConfigError, match="has no 'last_batch_iteration'"):
        s3.load_state_dict({})


def test_resume_via_last_batch_iteration_param():
    s = build("WarmupLR", warmup_num_steps=10, warmup_type="linear", warmup_max_lr=1.0, last_batch_iteration=4)
    assert s.get_last_lr() == approx([0.4])


def test_tensor_lr_is_updated_in_place_and_wrapped_optimizers_work():
    param = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([param], lr=torch.tensor(0.5), foreach=False)
    lr_tensor = opt.param_groups[0]["lr"]
    s = build_scheduler(SchedulerConfig(type="WarmupLR", params={"warmup_num_steps": 4, "warmup_type": "linear"}),
                        opt)
    s.step(2)
    assert opt.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(0.25)
    param.grad = torch.ones(2)
    opt.step()  # still a working optimizer

    class Wrapper:  # e.g. a ZeRO wrapper exposing the inner optimizer
        def __init__(self, inner):
            self.optimizer = inner

    inner = optimizer()
    s = build("LRRangeTest", Wrapper(inner), lr_range_test_min_lr=0.2)
    assert inner.param_groups[0]["lr"] == 0.2


# --- config errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("type_, params, pattern", [
    ("WarmupLR", {"warmup_max": 0.1}, r"WarmupLR: unknown param 'warmup_max'.*did you mean 'warmup_max_lr'.*accepts"),
    ("WarmupLR", {"warmup_type": "cosine"}, r"warmup_type 'cosine' is not one of log, linear"),
    ("WarmupLR", {"warmup_num_steps": 2.5}, r"warmup_num_steps 2.5 must be a whole number"),
    ("WarmupLR", {"warmup_min_lr": [0.1, 0.2]}, r"warmup_min_lr has 2 values but the optimizer has 1 param groups"),
    ("WarmupLR", {"warmup_max_lr": "high"}, r"warmup_max_lr 'high' must be a finite number"),
    ("LRRangeTest", {"lr_range_test_staircase": "yes"}, r"lr_range_test_staircase 'yes' must be true or false"),
    ("LRRangeTest", {"lr_range_test_step_size": 0}, r"lr_range_test_step_size 0 must be a whole number >= 1"),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "cycle_first_step_size": 0}, r"cycle_first_step_size 0"),
    ("WarmupCosine", {}, r"scheduler type 'WarmupCosine' is not supported.*did you mean 'WarmupCosineLR'"),
])
def test_bad_scheduler_config(type_, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build(type_, **params)


def test_names_are_case_insensitive_and_params_listed():
    assert isinstance(build("warmuplr"), WarmupLR)
    assert isinstance(build("WARMUPDECAYLR", total_num_steps=2000), WarmupDecayLR)
    assert isinstance(build("onecycle", cycle_min_lr=0.1, cycle_max_lr=1.0), OneCycle)
    assert isinstance(build("lrrangetest"), LRRangeTest)
    assert isinstance(build("warmupcosinelr", total_num_steps=2000), WarmupCosineLR)
    assert scheduler_params("WarmupLR") == {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000,
                                            "warmup_type": "log", "last_batch_iteration": -1}


def test_deepspeed_config_end_to_end():
    config = parse_config({"train_micro_batch_size_per_gpu": 1,
                           "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                           "scheduler": {"type": "WarmupDecayLR", "params": {
                               "warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100,
                               "total_num_steps": 1000, "warmup_type": "linear"}}})
    s = build_scheduler(config.scheduler, optimizer())
    s.step(50)
    assert s.get_last_lr() == approx([1.5e-4])
    assert math.isclose(lrs_at(build_scheduler(config.scheduler, optimizer()), [999])[0], 3e-4 * 1 / 900)
