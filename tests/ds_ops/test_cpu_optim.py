"""CPU optimizers: parity with torch.optim (rtol 1e-6, atol 1e-7 after 10 steps), Lion against the
paper's update, fused bf16/fp16 copy-out, state_dict compatibility and bad inputs.

These run the C++ kernel (built once per session into the test cache)."""

from __future__ import annotations

import copy

import pytest
import torch

from ds_ops import DSCPUAdagrad, DSCPUAdam, DSCPULion, build
from ds_ops.cpu_optim import _adam_default
from ds_ops.registry import OpInputError

RTOL, ATOL, STEPS = 1e-6, 1e-7, 10


@pytest.fixture(autouse=True, scope="module")
def _kernel_built():
    assert build.load("cpu_optim") is not None  # fail loudly rather than silently test the default


def _params(seed=0, shapes=((257, 33), (1001,), (7,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _run(ref_opt, our_opt, ref_params, our_params, steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for a, b in zip(ref_params, our_params):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        ref_opt.step()
        our_opt.step()


def _pair(values):
    return ([torch.nn.Parameter(v.clone()) for v in values], [torch.nn.Parameter(v.clone()) for v in values])


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_matches_torch(adamw, wd):
    ref_p, our_p = _pair(_params())
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    ref = cls(ref_p, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd)
    ours = DSCPUAdam(our_p, lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd, adamw_mode=adamw)
    _run(ref, ours, ref_p, our_p)
    for a, b in zip(ref_p, our_p):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        sa, sb = ref.state[a], ours.state[b]
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=RTOL, atol=ATOL)
        assert float(sb["step"]) == float(sa["step"]) == STEPS


def test_adagrad_matches_torch():
    ref_p, our_p = _pair(_params())
    kw = dict(lr=0.05, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1, eps=1e-10)
    ref, ours = torch.optim.Adagrad(ref_p, **kw), DSCPUAdagrad(our_p, **kw)
    _run(ref, ours, ref_p, our_p)
    for a, b in zip(ref_p, our_p):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours.state[b]["sum"], ref.state[a]["sum"], rtol=RTOL, atol=ATOL)


def _lion_reference(p, m, g, lr, b1, b2, wd):
    """Chen et al. 2023, Algorithm 2, written out plainly."""
    c = b1 * m + (1 - b1) * g
    p = p - lr * (torch.sign(c) + wd * p)
    m = b2 * m + (1 - b2) * g
    return p, m


def test_lion_matches_paper_reference():
    values = _params()
    our_p = [torch.nn.Parameter(v.clone()) for v in values]
    ref = [(v.clone(), torch.zeros_like(v)) for v in values]
    ours = DSCPULion(our_p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grads = [torch.randn(v.shape, generator=g) for v in values]
        for p, grad in zip(our_p, grads):
            p.grad = grad
        ours.step()
        ref = [_lion_reference(p, m, grad, 1e-3, 0.9, 0.99, 0.1) for (p, m), grad in zip(ref, grads)]
    for b, (p, m) in zip(our_p, ref):
        torch.testing.assert_close(b.detach(), p, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ours.state[b]["exp_avg"], m, rtol=RTOL, atol=ATOL)


def test_kernel_matches_default_on_odd_sizes_and_thread_counts():
    n = 100_003  # not a multiple of any vector width, and enough for several threads
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(n, generator=g) for _ in range(2)] + [torch.rand(n, generator=g)]
    results = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p, m, v = base[0].clone(), base[1].clone() * 0.1, base[2].clone() * 0.01
            for step in (1, 2, 3):
                torch.ops.ds_ops.adam_step(p, base[1], m, v, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, step, True)
        finally:
            torch.set_num_threads(prev)
        results.append(p)
    assert torch.equal(results[0], results[1])  # elementwise: the thread split cannot change bits
    p, m, v = base[0].clone(), base[1].clone() * 0.1, base[2].clone() * 0.01
    for step in (1, 2, 3):
        _adam_default(p, base[1], m, v, None, 1e-3, 0.9, 0.999, 1e-8, 0.01, step, True)
    torch.testing.assert_close(results[0], p, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["adam", "adagrad", "lion"])
def test_fused_copy_equals_separate_cast(dtype, op):
    n = 4099
    g = torch.Generator().manual_seed(5)
    p, grad, s1, s2 = (torch.randn(n, generator=g) for _ in range(4))
    s2 = s2.abs()
    copy = torch.empty(n, dtype=dtype)
    if op == "adam":
        torch.ops.ds_ops.adam_step(p, grad, s1, s2, copy, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True)
    elif op == "adagrad":
        torch.ops.ds_ops.adagrad_step(p, grad, s2, copy, 1e-2, 1e-10, 0.0, 0.0, 1)
    else:
        torch.ops.ds_ops.lion_step(p, grad, s1, copy, 1e-3, 0.9, 0.99, 0.0)
    assert torch.equal(copy, p.to(dtype))


@pytest.mark.parametrize("cls, ref_cls, kw", [
    (DSCPUAdam, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    (DSCPUAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05, adamw_mode=False)),
    (DSCPUAdagrad, torch.optim.Adagrad, dict(lr=0.05, weight_decay=0.02)),
])
def test_grad_scale_equals_scaling_the_grads_first(cls, ref_cls, kw):
    """step(grad_scale=c) == grad.mul_(c); step() (the unscale/clip recipe), bit for bit, and the
    grad buffers are left as they were."""
    ref_p, our_p = _pair(_params())
    ref_kw = {k: v for k, v in kw.items() if k != "adamw_mode"}
    ref, ours = ref_cls(ref_p, **ref_kw), cls(our_p, **kw)
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        coef = [0.37, 1.0, 1 / 1024, 2.5][step]
        for a, b in zip(ref_p, our_p):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        kept = [b.grad.clone() for b in our_p]
        for a in ref_p:
            a.grad.mul_(coef)
        ref.step()
        ours.step(grad_scale=coef)
        assert all(torch.equal(b.grad, k) for b, k in zip(our_p, kept))
    for a, b in zip(ref_p, our_p):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_grad_scale_kernel_equals_default_and_lion():
    n = 100_003
    g = torch.Generator().manual_seed(4)
    p, grad, m = (torch.randn(n, generator=g) for _ in range(3))
    v = torch.rand(n, generator=g)
    a = [t.clone() for t in (p, m, v)]
    torch.ops.ds_ops.adam_step(a[0], grad, a[1], a[2], None, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, True, 0.25)
    b = [t.clone() for t in (p, m, v)]
    _adam_default(b[0], grad, b[1], b[2], None, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, True, 0.25)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)
    lp, lm = p.clone(), m.clone()
    torch.ops.ds_ops.lion_step(lp, grad, lm, None, 1e-3, 0.9, 0.99, 0.1, 0.5)
    rp, rm = _lion_reference(p, m, grad * 0.5, 1e-3, 0.9, 0.99, 0.1)
    torch.testing.assert_close(lp, rp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lm, rm, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_non_finite_grad_scale_is_refused(scale):
    p, g, m, v = _buffers()
    with pytest.raises(OpInputError, match="grad_scale=.* must be finite; on a loss-scale overflow skip"):
        torch.ops.ds_ops.adam_step(p, g, m, v, None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True, scale)
    assert torch.equal(p, torch.zeros(16))


def test_optimizer_copy_to_groups():
    values = _params()
    our_p = [torch.nn.Parameter(v.clone()) for v in values]
    copies = [torch.empty_like(v, dtype=torch.bfloat16) for v in values]
    opt = DSCPUAdam(our_p, lr=1e-2)
    for p in our_p:
        p.grad = torch.ones_like(p)
    opt.step(copy_to=[copies])
    for p, c in zip(our_p, copies):
        assert torch.equal(c, p.detach().to(torch.bfloat16))
    with pytest.raises(OpInputError, match="copy_to has 1 buffers for a group of 3 params"):
        opt.step(copy_to=[[copies[0]]])


def test_state_dict_round_trips_with_torch():
    ref_p, our_p = _pair(_params())
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.01)
    ours = DSCPUAdam(our_p, lr=1e-2, weight_decay=0.01)
    _run(ref, ours, ref_p, our_p, steps=3)
    sd = ours.state_dict()
    assert set(sd["state"][0]) == set(ref.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    # torch -> ours and ours -> torch, then continue both ways
    ours2 = DSCPUAdam([torch.nn.Parameter(p.detach().clone()) for p in ref_p], lr=1e-2, weight_decay=0.01)
    ours2.load_state_dict(copy.deepcopy(ref.state_dict()))  # as if saved and loaded
    ref2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in our_p], lr=1e-2,
                             weight_decay=0.01)
    ref2.load_state_dict(copy.deepcopy(sd))
    p_ours2 = ours2.param_groups[0]["params"]
    p_ref2 = ref2.param_groups[0]["params"]
    _run(ref, ours2, ref_p, p_ours2, steps=3, seed=9)
    _run(ours, ref2, our_p, p_ref2, steps=3, seed=9)
    for a, b, c, d in zip(ref_p, p_ours2, our_p, p_ref2):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(d, c, rtol=RTOL, atol=ATOL)


def _buffers(n=16):
    return [torch.zeros(n) for _ in range(4)]


@pytest.mark.parametrize("case, match", [
    ("size", "grad has 15 elements but param has 16"),
    ("dtype", "exp_avg is torch.bfloat16, the op updates fp32 buffers"),
    ("layout", "exp_avg_sq .* is not contiguous"),
    ("copy_dtype", "param_copy is torch.float32; it must be torch.bfloat16 or torch.float16"),
    ("copy_size", "param_copy must be a contiguous buffer of 16 elements"),
    ("step", "step=0; it is the 1-based count"),
])
def test_bad_inputs_are_named(case, match):
    p, g, m, v = _buffers()
    copy, step = None, 1
    if case == "size":
        g = torch.zeros(15)
    elif case == "dtype":
        m = torch.zeros(16, dtype=torch.bfloat16)
    elif case == "layout":
        v = torch.zeros(32)[::2]
    elif case == "copy_dtype":
        copy = torch.zeros(16)
    elif case == "copy_size":
        copy = torch.zeros(8, dtype=torch.bfloat16)
    elif case == "step":
        step = 0
    with pytest.raises(OpInputError, match=match):
        torch.ops.ds_ops.adam_step(p, g, m, v, copy, 1e-3, 0.9, 0.999, 1e-8, 0.0, step, True)


def test_optimizer_rejects_bad_params_and_hparams():
    with pytest.raises(ValueError, match=r"DSCPUAdam: betas\[1\]=1.0 must be in \[0.0, 1.0\)"):
        DSCPUAdam([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(OpInputError, match="param is torch.bfloat16"):
        DSCPUAdam([p]).step()
    q = torch.nn.Parameter(torch.zeros(4, device="meta"))
    q.grad = torch.zeros(4, device="meta")
    with pytest.raises(OpInputError, match="updates CPU params; param 0 is on meta"):
        DSCPULion([q]).step()
