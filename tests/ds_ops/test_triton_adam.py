"""ds_ops::fused_adam: the default against torch.optim.AdamW/Adam, and the Triton kernel against the
default on CPU tensors under TRITON_INTERPRET=1 (set here before triton is first imported).

Tolerances: the default follows torch's operation order, so it matches torch.optim to 1e-6; the
kernel does the same math in fp32 with IEEE sqrt/div, within 1e-6 absolute / 1e-5 relative.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton


import pytest  # noqa: E402
import torch  # noqa: E402

from ds_ops.fused_adam import FusedAdam, _fused_adam_cuda, fused_adam_reference  # noqa: E402

SHAPES = [(7,), (33, 5), (300,), (2, 3, 4)]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


@pytest.fixture
def kernel(triton_kernels):
    return triton_kernels("adam")


def _state(seed=0, grad_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [torch.randn(s, generator=g).to(grad_dtype) for s in SHAPES]
    exp_avgs = [0.1 * torch.randn(s, generator=g) for s in SHAPES]
    exp_avg_sqs = [0.1 * torch.rand(s, generator=g) for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs


def _clone(tensors):
    return [t.clone() for t in tensors]


def _train(model, opt, steps=5):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()


def _models(dtype=torch.float32):
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    return ours, ref


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_default_matches_torch(adam_w_mode):
    ours, ref = _models()
    _train(ours, FusedAdam(ours.parameters(), lr=1e-2, weight_decay=0.1, adam_w_mode=adam_w_mode))
    ref_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    _train(ref, ref_cls(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_adam_bf16_model_keeps_fp32_master():
    """bf16 weights: the fp32 master follows AdamW on the fp32 model step for step only when the grads
    agree, so compare one step from the same grads; the model copy is the master rounded to bf16."""
    ours, ref = _models(torch.bfloat16)
    opt = FusedAdam(ours.parameters(), lr=1e-2, weight_decay=0.1)
    _train(ours, opt, steps=1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for p, r in zip(ours.parameters(), ref.parameters()):
        r.grad = p.grad.float()
    ref_opt.step()
    for p, r in zip(ours.parameters(), ref.parameters()):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        # ours starts from bf16-rounded weights, as ref does (loaded from the bf16 model)
        torch.testing.assert_close(master, r.detach(), atol=1e-6, rtol=1e-6)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))


def test_fused_adam_list_errors_name_the_mismatch():
    params, grads, exp_avgs, exp_avg_sqs = _state()
    with pytest.raises(ValueError, match="exp_avgs has 3 tensors but params has 4"):
        fused_adam_reference(params, grads, exp_avgs[:3], exp_avg_sqs, [], 1, **HP)
    with pytest.raises(ValueError, match="lr=-1"):
        FusedAdam([torch.nn.Parameter(torch.zeros(2))], lr=-1)


def test_fused_adam_op_passes_opcheck():
    params, grads, exp_avgs, exp_avg_sqs = _state()
    model = [p.to(torch.bfloat16) for p in params]
    args = (params, grads, exp_avgs, exp_avg_sqs, model, 3, 1e-2, 0.9, 0.99, 1e-8, 0.1, True, True, 1.0)
    torch.library.opcheck(torch.ops.ds_ops.fused_adam.default, args)


@pytest.mark.parametrize(
    "adamw,grad_dtype,model_dtype,grad_scale",
    [
        (True, torch.float32, None, 1.0),
        (False, torch.float32, None, 1.0),
        (True, torch.bfloat16, torch.bfloat16, 1.0),
        (True, torch.float16, torch.float16, 128.0),
    ],
)
def test_kernel_matches_default(kernel, adamw, grad_dtype, model_dtype, grad_scale):
    params, grads, exp_avgs, exp_avg_sqs = _state(grad_dtype=grad_dtype)
    ref = [_clone(params), _clone(exp_avgs), _clone(exp_avg_sqs)]
    model = [torch.empty_like(p, dtype=model_dtype) for p in params] if model_dtype else []
    hp = dict(HP, adamw=adamw, grad_scale=grad_scale)
    # small chunks so one tensor spans several programs and a chunk several vector steps
    kernel.fused_adam_launch(params, grads, exp_avgs, exp_avg_sqs, model, 3, **hp, chunk=64, block=32)
    fused_adam_reference(ref[0], grads, ref[1], ref[2], [], 3, **hp)
    for ours, theirs in zip((params, exp_avgs, exp_avg_sqs), ref):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # within one ulp of the fp32 master: the interpreter truncates fp32 -> bf16 where GPUs round to
    # nearest, so exact equality with torch's cast holds on GPU only
    ulp = {None: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[model_dtype]
    for w, p in zip(model, params):
        assert ((w.float() - p).abs() <= ulp * p.abs()).all()


def test_kernel_steps_match_torch_adamw(kernel):
    params, grads, _, _ = _state()
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(1, 4):
        for r, g in zip(ref, grads):
            r.grad = g
        opt.step()
        kernel.fused_adam_launch(params, grads, exp_avgs, exp_avg_sqs, [], step, **HP, chunk=128, block=64)
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)


def test_cuda_registration_runs_kernel_or_falls_back(kernel):
    """The function registered for "cuda", called on CPU tensors, launches the (interpreted) kernel;
    a non-contiguous param sends it to the default instead of failing."""
    params, grads, exp_avgs, exp_avg_sqs = _state()
    ref = [_clone(params), _clone(exp_avgs), _clone(exp_avg_sqs)]
    _fused_adam_cuda(params, grads, exp_avgs, exp_avg_sqs, [], 2, *HP.values())
    fused_adam_reference(ref[0], grads, ref[1], ref[2], [], 2, **HP)
    for a, b in zip(params, ref[0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    base = torch.randn(6, 4)
    p = base.t()  # non-contiguous
    expect = p.clone()
    g, m, v = torch.randn(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)
    assert kernel.unsupported_reason([p], [g], [m], [v], []) is not None
    _fused_adam_cuda([p], [g], [m], [v], [], 1, *HP.values())
    fused_adam_reference([expect], [g], [m.clone().zero_()], [v.clone().zero_()], [], 1, **HP)
    torch.testing.assert_close(p, expect)
