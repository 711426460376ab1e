"""Stage-3 prefetching (``ds_zero/prefetch.py``) on 2 gloo ranks: same numbers, fewer waits.

Tolerance: fp32 losses equal to PyTorch DDP's to 1e-5 (absolute) over 8 steps, with AdamW and
clipping, for a tiny prefetch bucket with a live-parameter cap and for prefetch disabled; a model
whose module order changes on some steps (the same on every rank) equals DDP too.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from ds_zero.fingerprint import name_of

from ._train import ddp_losses, engine_losses, make_model, max_diff, train


def _prefetcher(engine):
    return engine.optimizer.parts.coordinator.prefetcher


def _all_released(engine) -> bool:
    return not any(s.gathered or getattr(s, "inflight", None) for g in engine.optimizer.parts.groups
                   for s in g.sharded if not s.persistent)


@pytest.mark.world_size(2)
def test_tiny_prefetch_bucket_and_live_cap_match_ddp():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 8)
    ours, engine = engine_losses(copy.deepcopy(model), 8, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 40, "stage3_prefetch_bucket_size": 500,
        "stage3_max_live_parameters": 8000, "stage3_max_reuse_distance": 0})
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    pf = _prefetcher(engine)
    assert pf.settings.prefetch_bucket == 500 and pf.settings.max_live == 8000
    assert pf.stats["prefetched"] > 0 and pf.stats["notices"] == 0
    assert pf.stats["peak_resident"] <= 8000, pf.stats
    guarded = pf.stats["guarded"]
    train(engine, 2, first_step=8)  # steady state: the logged gathers replay without header exchanges
    assert pf.stats["guarded"] == guarded
    assert _all_released(engine)


@pytest.mark.world_size(2)
def test_prefetch_disabled_matches_ddp_and_default_keeps_parameters_for_backward():
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 8)
    off, engine = engine_losses(copy.deepcopy(model), 8, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 40, "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0})
    assert max_diff(off, ref) < 1e-5, (off, ref)
    assert _prefetcher(engine).stats["prefetched"] == 0
    ours, engine = engine_losses(copy.deepcopy(model), 8, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 40})
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    pf = _prefetcher(engine)
    before = dict(pf.stats)
    train(engine, 1, first_step=8)
    # DeepSpeed's defaults: one gather on demand (the first module), the rest ahead of use, and none
    # for backward (every parameter is used again within stage3_max_reuse_distance, so it is kept)
    assert pf.stats["on_demand"] - before["on_demand"] == 1
    assert pf.stats["prefetched"] - before["prefetched"] > 0
    assert all(name_of(target).endswith("(forward)") for _, target, _ in pf.plans[(True, True)])
    assert _all_released(engine)


class Branchy(torch.nn.Module):
    """``b1`` and ``b2`` (same shape) run in either order: ``order`` is a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 24)
        self.b1 = torch.nn.Linear(24, 24)
        self.b2 = torch.nn.Linear(24, 24)
        self.c = torch.nn.Linear(24, 4)
        self.swap = False
        self.skip = False

    def forward(self, x, y):
        h = torch.tanh(self.a(x))
        first, second = (self.b2, self.b1) if self.swap else (self.b1, self.b2)
        if not self.skip:
            h = torch.tanh(first(h))
        h = torch.tanh(second(h))
        return torch.nn.functional.cross_entropy(self.c(h), y)


def branchy_batch(step: int):
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def branchy_engine(model, **zero):
    import ds_core

    return ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 6, "gradient_clipping": 1.0, "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero}})[0]


@pytest.mark.world_size(2)
@pytest.mark.parametrize("bucket", [50_000_000, 300])
def test_order_changing_on_every_rank_falls_back_and_rerecords(bucket):
    torch.manual_seed(0)
    model = Branchy()
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    engine = branchy_engine(copy.deepcopy(model), stage3_prefetch_bucket_size=bucket)
    for step in range(8):
        swap = step in (3, 6)  # the same on every rank, unknown to the recorded order
        ddp.module.swap = engine.module.swap = swap
        x, y = branchy_batch(step)
        ddp(x, y).backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            ref, ours = ddp.module(x, y), engine(x, y)
        assert abs(float(ref) - float(ours)) < 1e-5, step
    pf = _prefetcher(engine)
    assert pf.stats["prefetched"] > 0
    if bucket == 300:  # gathers ahead were logged: leaving them sends a notice instead of a guess
        assert pf.stats["notices"] > 0
    assert _all_released(engine)
