"""With ds-ops installed, the engine's optimizer factory picks the C++ CPU optimizers through the registry."""

import pytest
import torch

from ds_core.config import OptimizerConfig
from ds_core.engine.optimizers import build_optimizer, describe
from ds_ops.cpu_optim import DSCPUAdagrad, DSCPUAdam, DSCPULion


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]


@pytest.mark.smoke
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


def _engine_run(precision: dict, client: bool, steps: int = 6):
    """Train a small GPT in one process; ``client`` passes torch.optim.AdamW instead of the config's."""
    import ds_core
    from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

    cfg = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0, "gradient_clipping": 0.05,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}, **precision}
    opt = None
    if client:
        config.pop("optimizer")
        opt = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)  # noqa: E731
    engine, optimizer, *_ = ds_core.initialize(model=model, optimizer=opt, config=config)
    for step in range(steps):
        x, y = synthetic_tokens(2, cfg.seq_len, cfg.vocab_size, step, 0)
        engine.backward(engine(x, y))
        engine.step()
    return engine, [p.detach().clone() for p in model.parameters()]


def test_engine_fuses_unscale_clip_and_copy_into_the_cpu_step():
    """bf16 and fp16 with clipping: the fused step (coefficient and model-dtype copy inside the
    kernel's pass) gives the model torch.optim.AdamW gives through separate passes. bf16 has no loss
    scale, so the numbers are the same (1e-6); fp16 multiplies once by unscale x clip instead of twice,
    a rounding apart, which Adam's normalisation carries to a few fp16 ulps after 6 steps (1e-2)."""
    from ds_core.optim.fused import fuses

    for precision, atol in (({"bf16": {"enabled": True}}, 1e-6),
                            ({"fp16": {"enabled": True, "initial_scale_power": 8}}, 1e-2)):
        engine, fused = _engine_run(precision, client=False)
        wrapper = engine.optimizer
        assert fuses(wrapper.optimizer, "grad_scale", "copy_to"), describe(wrapper.optimizer)
        assert wrapper._fused_copies, "no model parameter took the fused copy"
        _, plain = _engine_run(precision, client=True)
        for a, b in zip(fused, plain):
            assert a.dtype in (torch.bfloat16, torch.float16)
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=atol)
