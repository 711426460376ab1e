"""A run started with DeepSpeed, converted after 10 steps and resumed in ds, matches DeepSpeed continuing
(ZeRO stages 0, 2 and 3).

Both run on the same 2 gloo ranks (DeepSpeed on its CPU accelerator), the same model, data, torch AdamW,
WarmupLR schedule and gradient clipping; fp32 everywhere, so the two continuations agree to float
rounding (tolerance 1e-5, absolute and relative) on the 10 losses and the final weights.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="needs DeepSpeed to write the checkpoint being converted: "
                                       "pip install deepspeed==0.19.8 torch==2.13.0")

TOL = 1e-5


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 1.0,
            "scheduler": {"type": "WarmupLR",
                          "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 15}}}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(20)]


def _steps(engine, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _deepspeed_run(stage: int, save_dir, data):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(stage))
    _steps(engine, data[:10])
    engine.save_checkpoint(str(save_dir), client_state={"epoch": 3})
    losses = _steps(engine, data[10:])
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    else:
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.destroy()
    return losses, weights


def _ds_resume(stage: int, ckpt, data):
    import ds_core

    model = _model(1)  # other initial weights: everything must come from the checkpoint
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    engine, *_ = ds_core.initialize(model=model, optimizer=opt, config=_config(stage))
    _, client = engine.load_checkpoint(str(ckpt))
    assert client["epoch"] == 3 and engine.global_steps == 10
    losses = _steps(engine, data[10:])
    if stage == 3:
        from ds_zero.checkpoint3 import gathered_state_dict

        weights = gathered_state_dict(engine, rank0_only=False)
    else:
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, weights


def _parity(stage: int, tmp_path) -> None:
    import torch.distributed as dist

    from ds_core.convert import convert_deepspeed

    rank = dist.get_rank()
    data = _data(rank)
    ds_losses, ds_weights = _deepspeed_run(stage, tmp_path / "deepspeed", data)
    if rank == 0:
        convert_deepspeed(tmp_path / "deepspeed", tmp_path / "converted")
    dist.barrier()
    losses, weights = _ds_resume(stage, tmp_path / "converted", data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ds_losses), rtol=TOL, atol=TOL)
    assert weights.keys() == ds_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], ds_weights[key], rtol=TOL, atol=TOL, msg=key)


# 900 s: a hang guard only; real DeepSpeed runs (JIT op checks, 20 steps, two resumes) took over 300 s on
# two cores shared with two other full suites
@pytest.mark.world_size(2, timeout=900)
def test_stage2_run_converted_after_10_steps_resumes_like_deepspeed(tmp_path):
    _parity(2, tmp_path)


@pytest.mark.world_size(2, timeout=900)
def test_stage3_run_converted_after_10_steps_resumes_like_deepspeed(tmp_path):
    _parity(3, tmp_path)


@pytest.mark.world_size(2, timeout=900)
def test_stage0_run_converted_after_10_steps_resumes_like_deepspeed(tmp_path):
    _parity(0, tmp_path)
