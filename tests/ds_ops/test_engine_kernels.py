"""With ds-ops installed, the engine's optimizer factory picks the C++ CPU optimizers through the registry."""

import torch

from ds_core.config import OptimizerConfig
from ds_core.engine.optimizers import build_optimizer, describe
from ds_ops.cpu_optim import DSCPUAdagrad, DSCPUAdam, DSCPULion


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]


def test_factory_uses_cpu_kernels():
    for name, cls in (("AdamW", DSCPUAdam), ("Adam", DSCPUAdam), ("Adagrad", DSCPUAdagrad), ("Lion", DSCPULion)):
        opt = build_optimizer(OptimizerConfig(type=name, params={"lr": 1e-3}), _params(), device_type="cpu")
        assert isinstance(opt, cls), describe(opt)


def test_kernel_adamw_matches_torch_through_factory():
    ours_params, ref_params = _params(), _params()
    ours = build_optimizer(OptimizerConfig(type="AdamW", params={"lr": 1e-2, "weight_decay": 0.1}), ours_params)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours_params, ref_params):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
