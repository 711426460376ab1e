"""build_optimizer: parity with torch.optim and with the Lamb/Lion papers, config errors, the kernel seam.

Tolerances: torch optimizers are compared in fp32 at rtol 1e-5 / atol 1e-6 (the factory may pick a
fused kernel whose rounding differs from the reference loop); Lamb and Lion run in fp64 against
re-implementations written here from the papers' equations, at atol 1e-12.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import ds_core.ops
from ds_core.config import OptimizerConfig, parse_config
from ds_core.engine.lamb_lion import Lamb, Lion
from ds_core.engine.optimizers import build_optimizer, describe, kernel_optimizer_class
from ds_core.errors import ConfigError


@pytest.fixture(autouse=True)
def no_installed_kernels(monkeypatch):
    """These tests pin torch's implementations; tests of the kernel seam install fake providers."""
    monkeypatch.setattr(ds_core.ops, "providers", dict)

STEPS = 5


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 4)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def two_groups(params, lrs=(0.01, 0.003), decays=(0.1, 0.0)):
    return [{"params": params[:2], "lr": lrs[0], "weight_decay": decays[0]},
            {"params": params[2:], "lr": lrs[1], "weight_decay": decays[1]}]


def run(optimizer, params, steps=STEPS):
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


def build(type_, params, **hyper):
    return build_optimizer(OptimizerConfig(type=type_, params=hyper), params)


def assert_close_lists(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


# --- torch.optim parity -------------------------------------------------------------------------

TORCH_CASES = [
    # (config type, config params, reference class, reference kwargs)
    ("Adam", {"betas": [0.8, 0.99], "eps": 1e-7}, torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-7}),
    ("Adam", {"adam_w_mode": True}, torch.optim.AdamW, {}),
    ("Adam", {"adam_w_mode": False}, torch.optim.Adam, {}),
    ("adamw", {"torch_adam": True, "amsgrad": True}, torch.optim.AdamW, {"amsgrad": True}),
    ("ADAM", {"torch_adam": True, "adam_w_mode": False}, torch.optim.Adam, {}),
    ("SGD", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("SGD", {"momentum": 0.5, "dampening": 0.1}, torch.optim.SGD, {"momentum": 0.5, "dampening": 0.1}),
    ("Adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1},
     torch.optim.Adagrad, {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
]


@pytest.mark.parametrize("type_, hyper, ref_cls, ref_kwargs", TORCH_CASES)
def test_torch_optimizers_match_reference_with_param_groups(type_, hyper, ref_cls, ref_kwargs):
    ours_params, ref_params = make_params(), make_params()
    ours = build(type_, two_groups(ours_params), **hyper)
    assert isinstance(ours, ref_cls) and type(ours) is ref_cls
    # per-group hyper-parameters survive; the config's values fill the rest
    assert [g["lr"] for g in ours.param_groups] == [0.01, 0.003]
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    reference = ref_cls(two_groups(ref_params), **ref_kwargs)
    assert_close_lists(run(ours, ours_params), run(reference, ref_params), rtol=1e-5, atol=1e-6)


def test_adam_w_mode_changes_the_update():
    decoupled, l2 = make_params(), make_params()
    a = run(build("Adam", decoupled, weight_decay=0.5, lr=0.1), decoupled)
    b = run(build("Adam", l2, weight_decay=0.5, lr=0.1, adam_w_mode=False), l2)
    assert not torch.allclose(a[0], b[0])


def test_plain_tensor_list_and_generator_are_accepted():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(OptimizerConfig(type="AdamW", params={"lr": 0.5}), model.parameters())
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2
    assert opt.param_groups[0]["lr"] == 0.5


def test_auto_values_and_defaults():
    params = make_params()
    opt = build("AdamW", params, lr="auto", betas="auto", eps="auto", weight_decay="auto")
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and tuple(group["betas"]) == (0.9, 0.999) and group["eps"] == 1e-8
    assert group["weight_decay"] == 0.0  # DeepSpeed's default, not torch.optim.AdamW's 0.01
    assert build("SGD", make_params()).param_groups[0]["lr"] == 1e-3
    assert build("Adagrad", make_params()).param_groups[0]["lr"] == 1e-2
    lion = build("Lion", make_params()).param_groups[0]
    assert lion["lr"] == 1e-3 and lion["betas"] == (0.9, 0.999)
    lamb = build("Lamb", make_params()).param_groups[0]
    assert (lamb["max_coeff"], lamb["min_coeff"]) == (10.0, 0.01)


def test_numbers_written_as_strings_are_read():
    opt = build("AdamW", make_params(), lr="3e-4", eps="1e-08", betas=["0.9", "0.95"])
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_fused_on_cpu_and_explicit_choice_respected():
    assert build("AdamW", make_params()).param_groups[0]["fused"] is True
    assert "fused=True" in describe(build("AdamW", make_params()))
    explicit = build("AdamW", make_params(), fused=False, foreach=False)
    assert not explicit.param_groups[0]["fused"] and not explicit.param_groups[0]["foreach"]
    assert describe(explicit) == "torch.optim.AdamW [decoupled weight decay]"
    assert "[L2 weight decay]" in describe(build("Adam", make_params(), adam_w_mode=False))


def test_deepspeed_config_end_to_end():
    config = parse_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {
        "type": "Adam", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                   "adam_w_mode": True}}})
    opt = build_optimizer(config.optimizer, make_params())
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.1


# --- Lamb and Lion against the papers ------------------------------------------------------------

def lamb_reference(params, steps, lr, betas, eps, wd, min_coeff, max_coeff):
    """You et al. 2019, Algorithm 2, per tensor, with DeepSpeed's clamp on the trust ratio."""
    b1, b2 = betas
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t in range(1, steps + 1):
        for i, g in enumerate(grads_for(params, t - 1)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            v_hat = v[i] / (1 - b2**t)
            r = m_hat / (v_hat.sqrt() + eps) + wd * w[i]
            w_norm, r_norm = w[i].norm().item(), r.norm().item()
            trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            trust = min(max(trust, min_coeff), max_coeff)
            w[i] = w[i] - lr * trust * r
    return w


def lion_reference(params, steps, lr, betas, wd):
    """Chen et al. 2023, Algorithm 2."""
    b1, b2 = betas
    w = [p.detach().clone() for p in params]
    m = [torch.zeros_like(x) for x in w]
    for t in range(steps):
        for i, g in enumerate(grads_for(params, t)):
            c = b1 * m[i] + (1 - b1) * g
            w[i] = w[i] - lr * (torch.sign(c) + wd * w[i])
            m[i] = b2 * m[i] + (1 - b2) * g
    return w


@pytest.mark.parametrize("min_coeff, max_coeff", [(0.01, 10.0), (0.01, 0.05), (2.0, 10.0)])
def test_lamb_matches_paper(min_coeff, max_coeff):
    params = make_params(torch.float64)
    params.append(torch.zeros(4, dtype=torch.float64, requires_grad=True))  # ||w|| = 0: trust ratio 1
    hyper = dict(lr=0.02, betas=[0.9, 0.99], eps=1e-6, weight_decay=0.05, min_coeff=min_coeff, max_coeff=max_coeff)
    expected = lamb_reference(params, STEPS, 0.02, (0.9, 0.99), 1e-6, 0.05, min_coeff, max_coeff)
    opt = build("LAMB", params, **hyper)
    assert isinstance(opt, Lamb) and describe(opt) == "ds_core Lamb (pure PyTorch)"
    assert_close_lists(run(opt, params), expected, rtol=0, atol=1e-12)


def test_lamb_clipping_and_eps_inside_sqrt_change_the_update():
    base = run(build("Lamb", p := make_params(torch.float64), lr=0.01), p)
    clipped = run(build("Lamb", p := make_params(torch.float64), lr=0.01, max_grad_norm=0.01), p)
    inside = run(build("Lamb", p := make_params(torch.float64), lr=0.01, eps=0.5, eps_inside_sqrt=True), p)
    outside = run(build("Lamb", p := make_params(torch.float64), lr=0.01, eps=0.5), p)
    assert not torch.allclose(base[0], clipped[0]) and not torch.allclose(inside[0], outside[0])


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_lion_matches_paper(wd):
    params = make_params(torch.float64)
    expected = lion_reference(params, STEPS, 0.01, (0.9, 0.99), wd)
    opt = build("lion", params, lr=0.01, betas=[0.9, 0.99], weight_decay=wd)
    assert isinstance(opt, Lion)
    assert_close_lists(run(opt, params), expected, rtol=0, atol=1e-12)


def test_lamb_and_lion_keep_per_group_hyperparameters():
    params = make_params(torch.float64)
    opt = build("Lion", [{"params": params[:1], "lr": 0.1}, {"params": params[1:]}], lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    before = params[0].detach().clone()
    run(opt, params, steps=1)
    # Lion moves every coordinate by exactly lr (no weight decay)
    torch.testing.assert_close((params[0].detach() - before).abs(), torch.full_like(before, 0.1))


def test_lamb_lion_state_dict_round_trip():
    params = make_params(torch.float64)
    opt = build("Lamb", params, lr=0.01)
    run(opt, params, steps=2)
    clone = [p.detach().clone().requires_grad_() for p in params]
    opt2 = build("Lamb", clone, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved and loaded: no shared tensors
    assert_close_lists(run(opt2, clone, steps=2), run(opt, params, steps=2), rtol=0, atol=0)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_, hyper, pattern", [
    ("Adamw", {"betas1": 0.9}, r"optimizer AdamW: unknown param 'betas1'.*did you mean 'betas'.*accepts .*eps"),
    ("SGD", {"betas": [0.9, 0.9]}, r"optimizer SGD: unknown param 'betas'.*accepts .*momentum"),
    ("Lion", {"eps": 1e-8}, r"optimizer Lion: unknown param 'eps'.*accepts betas, lr, weight_decay"),
    ("Adam", {"betas": [0.9]}, r"betas \[0.9\] must be two numbers"),
    ("Adam", {"betas": [0.9, 1.5]}, r"betas \[0.9, 1.5\] must both lie in \[0, 1\)"),
    ("Adam", {"lr": -1}, r"lr -1 must be >= 0"),
    ("Adam", {"lr": "fast"}, r"lr 'fast' must be a finite number"),
    ("Adam", {"amsgrad": "yes"}, r"amsgrad 'yes' must be true or false"),
    ("Adam", {"bias_correction": False}, r"bias_correction false is not supported"),
    ("Lamb", {"amsgrad": True}, r"Lamb: amsgrad true is not supported"),
    ("Lamb", {"min_coeff": 2.0, "max_coeff": 1.0}, r"optimizer Lamb: need 0 <= min_coeff <= max_coeff"),
    ("SGD", {"nesterov": True}, r"optimizer SGD: .*[Nn]esterov"),
    ("Adamax", {}, r"optimizer type 'Adamax' is not supported.*Adam, AdamW, SGD, Adagrad, Lamb, Lion"),
])
def test_bad_config_raises_config_error(type_, hyper, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build(type_, make_params(), **hyper)


def test_bad_params_argument():
    with pytest.raises(ConfigError, match="params is empty"):
        build("Adam", [])
    with pytest.raises(ConfigError, match="mixes tensors and param-group dicts"):
        p = make_params()
        build("Adam", [p[0], {"params": p[1:]}])
    with pytest.raises(ConfigError, match="param group 0 has no 'params' key"):
        build("Adam", [{"lr": 0.1}])


def test_adamw_with_adam_w_mode_false_warns_and_stays_decoupled():
    with pytest.warns(UserWarning, match="AdamW always decouples"):
        opt = build("AdamW", make_params(), adam_w_mode=False)
    assert type(opt) is torch.optim.AdamW


# --- kernel seam ---------------------------------------------------------------------------------

class FakeKernelAdamW(torch.optim.AdamW):
    created: list[dict] = []

    def __init__(self, params, lr, betas, eps, weight_decay):
        FakeKernelAdamW.created.append(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)


class FakeKernelAdagrad(torch.optim.Adagrad):
    device_types = ("cpu", "fakedev")

    def __init__(self, params, lr, eps, weight_decay):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay)


@pytest.fixture
def fake_providers(monkeypatch):
    """Replace the op registry's providers with the mapping the test sets."""
    registry: dict[str, object] = {}
    monkeypatch.setattr(ds_core.ops, "providers", lambda: dict(registry))
    FakeKernelAdamW.created = []
    return registry


def test_no_provider_means_no_kernel(fake_providers):
    fake_providers["plain"] = SimpleNamespace()  # a provider without optimizers
    assert kernel_optimizer_class("adamw", "cpu") is None


def test_kernel_from_mapping_is_used_for_fp32_cpu_params(fake_providers):
    fake_providers["fast"] = SimpleNamespace(optimizer_classes={"adamw": FakeKernelAdamW})
    assert kernel_optimizer_class("AdamW", "cpu") is FakeKernelAdamW
    assert kernel_optimizer_class("adamw", "cuda") is None  # mapping classes serve CPU unless they say more
    assert kernel_optimizer_class("adam", "cpu") is None
    params, ref_params = make_params(), make_params()
    opt = build("Adam", two_groups(params), lr=0.02, betas=[0.8, 0.9])  # Adam + adam_w_mode -> "adamw"
    assert type(opt) is FakeKernelAdamW
    assert FakeKernelAdamW.created == [dict(lr=0.02, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.0)]
    assert describe(opt).startswith("kernel ") and "FakeKernelAdamW" in describe(opt) and "'fast'" in describe(opt)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.003]  # group values still win
    reference = torch.optim.AdamW(two_groups(ref_params), betas=(0.8, 0.9))
    assert_close_lists(run(opt, params), run(reference, ref_params), rtol=1e-5, atol=1e-6)


def test_kernel_mapping_device_types(fake_providers):
    fake_providers["dev"] = SimpleNamespace(optimizer_classes={"adagrad": FakeKernelAdagrad})
    assert kernel_optimizer_class("adagrad", "fakedev") is FakeKernelAdagrad
    assert kernel_optimizer_class("adagrad", "cpu") is FakeKernelAdagrad
    assert type(build("Adagrad", make_params())) is FakeKernelAdagrad


def test_kernel_from_callable(fake_providers):
    asked = []

    def optimizer_class(name, device_type):
        asked.append((name, device_type))
        return FakeKernelAdamW if (name, device_type) == ("adamw", "cpu") else None

    fake_providers["a"] = SimpleNamespace(optimizer_class=optimizer_class)
    assert kernel_optimizer_class("adamw", "cpu") is FakeKernelAdamW
    assert kernel_optimizer_class("lion", "cpu") is None
    assert type(build("AdamW", make_params())) is FakeKernelAdamW
    # an optimizer_classes attribute may itself be the callable
    fake_providers.clear()
    fake_providers["b"] = SimpleNamespace(optimizer_classes=optimizer_class)
    assert kernel_optimizer_class("adamw", "cpu") is FakeKernelAdamW
    assert ("lion", "cpu") in asked


@pytest.mark.parametrize("dtype, hyper, why", [
    (torch.bfloat16, {}, "parameters are torch.bfloat16, kernels take fp32"),
    (torch.float32, {"amsgrad": True}, "its constructor does not take amsgrad, which the config sets"),
    (torch.float32, {"maximize": True}, "does not take maximize"),
])
def test_kernel_skipped_with_a_reason(fake_providers, dtype, hyper, why):
    fake_providers["fast"] = SimpleNamespace(optimizer_classes={"adamw": FakeKernelAdamW})
    opt = build("AdamW", make_params(dtype), **hyper)
    assert type(opt) is torch.optim.AdamW and not FakeKernelAdamW.created
    assert "not used: " in describe(opt) and why in describe(opt)


def test_torch_adam_bypasses_kernels(fake_providers):
    fake_providers["fast"] = SimpleNamespace(optimizer_classes={"adamw": FakeKernelAdamW})
    opt = build("AdamW", make_params(), torch_adam=True)
    assert type(opt) is torch.optim.AdamW and "kernel" not in describe(opt)


def test_l2_adam_asks_for_the_adam_kernel(fake_providers):
    fake_providers["fast"] = SimpleNamespace(optimizer_classes={"adamw": FakeKernelAdamW})
    assert type(build("Adam", make_params(), adam_w_mode=False)) is torch.optim.Adam


class FakeCPUAdam(torch.optim.Optimizer):
    """DeepSpeed's CPU Adam convention: one class, adamw_mode picks the variant."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adamw_mode = adamw_mode


def test_kernel_told_which_adam_variant(fake_providers):
    fake_providers["cpu"] = SimpleNamespace(optimizer_classes={"adam": FakeCPUAdam, "adamw": FakeCPUAdam})
    assert build("Adam", make_params()).adamw_mode is True
    assert build("Adam", make_params(), adam_w_mode=False).adamw_mode is False
    opt = build("AdamW", make_params())
    assert opt.adamw_mode is True and opt.param_groups[0]["weight_decay"] == 0.0  # our default, not the class's


def test_kernel_gets_extra_keys_its_constructor_names(fake_providers):
    class FullAdagrad(torch.optim.Adagrad):
        def __init__(self, params, lr, eps, weight_decay, lr_decay=0.0):
            super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, lr_decay=lr_decay)

    fake_providers["cpu"] = SimpleNamespace(optimizer_classes={"adagrad": FullAdagrad})
    opt = build("Adagrad", make_params(), lr_decay=0.5)
    assert type(opt) is FullAdagrad and opt.param_groups[0]["lr_decay"] == 0.5
    opt = build("Adagrad", make_params(), initial_accumulator_value=0.5)
    assert type(opt) is not FullAdagrad and "does not take initial_accumulator_value" in describe(opt)


def test_broken_providers_are_reported_and_skipped(fake_providers):
    def broken(name, device_type):
        raise RuntimeError("kernel build failed")

    fake_providers["a_broken"] = SimpleNamespace(optimizer_class=broken)
    fake_providers["b_wrong"] = SimpleNamespace(optimizer_classes={"adamw": object})
    fake_providers["c_bad_type"] = SimpleNamespace(optimizer_classes=42)
    with pytest.warns(RuntimeWarning) as record:
        opt = build("AdamW", make_params())
    assert type(opt) is torch.optim.AdamW
    messages = " | ".join(str(w.message) for w in record)
    assert "'a_broken'" in messages and "kernel build failed" in messages
    assert "'b_wrong'" in messages and "not a torch.optim.Optimizer subclass" in messages
    assert "'c_bad_type'" in messages


def test_kernel_whose_constructor_fails_falls_back(fake_providers):
    class Picky(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            raise TypeError("unexpected keyword 'betas'")

    fake_providers["p"] = SimpleNamespace(optimizer_classes={"adamw": Picky})
    with pytest.warns(RuntimeWarning, match="construction failed"):
        opt = build("AdamW", make_params())
    assert type(opt) is torch.optim.AdamW and "construction failed" in describe(opt)


def test_describe_of_foreign_optimizer():
    opt = torch.optim.SGD(make_params(), lr=0.1)
    assert describe(opt) == "torch.optim.sgd.SGD"
    assert math.isclose(opt.param_groups[0]["lr"], 0.1)
