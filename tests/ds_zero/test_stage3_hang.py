"""A rank that runs other modules than its peers under stage 3 fails, naming the modules, instead of hanging.

2 gloo ranks; rank 1 skips or swaps a module (``Branchy`` of ``test_stage3_prefetch.py``) on the
first step (before the module order is recorded), after it is recorded with everything gathered ahead
(caught by the once-per-step path digest), and with a small prefetch bucket (caught by the notice in
place of the next logged gather). A gather no peer ever joins ends after ``stage3_hang_timeout``.
The marker's timeout bounds each test should detection ever fail.
"""

import time

import pytest
import torch.distributed as dist

from ds_zero.fingerprint import GatherTimeoutError, ModulePathMismatchError

from .test_stage3_prefetch import Branchy, branchy_batch, branchy_engine


def _train_until_failure(engine, steps: int, diverge_at: int, change) -> int:
    for step in range(steps):
        if step == diverge_at and dist.get_rank() == 1:
            change(engine.module)
        x, y = branchy_batch(step)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    return steps


def _skip(m):
    m.skip = True


def _swap(m):
    m.swap = True


@pytest.mark.world_size(2, timeout=60)
@pytest.mark.parametrize("when, bucket, change, names", [
    (0, 50_000_000, _swap, ["'b1 (forward)'", "'b2 (forward)'"]),                  # first step: header exchange
    (3, 50_000_000, _skip, ["'b2 (forward)'", "'b1 (forward)' was recorded"]),      # replay: path digest
    (3, 300, _swap, ["'b2 (forward)'", "'b1 (forward)' was recorded"]),             # replay: notice
])
def test_rank_taking_another_module_path_fails_naming_the_modules(when, bucket, change, names):
    engine = branchy_engine(Branchy(), stage3_prefetch_bucket_size=bucket)
    with pytest.raises(ModulePathMismatchError, match="ranks are running different modules") as info:
        _train_until_failure(engine, 6, when, change)
    text = str(info.value)
    for name in names:
        assert name in text, text
    assert "rank 1" in text and "(this rank)" in text


@pytest.mark.world_size(2, timeout=120)
def test_gather_no_peer_joins_times_out_naming_the_module():
    # the steps every rank runs get a generous bound (a loaded machine can hold a rank back for seconds);
    # only the extra forward that no peer joins gets the short one
    engine = branchy_engine(Branchy(), stage3_hang_timeout=60.0)
    _train_until_failure(engine, 2, -1, None)
    coordinator = engine.optimizer.parts.coordinator
    coordinator.configure(coordinator.prefetcher.settings._replace(hang_timeout=2.0))
    if dist.get_rank() == 0:  # an extra forward of one module, on one rank only
        x, _ = branchy_batch(0)
        start = time.monotonic()
        with pytest.raises(GatherTimeoutError, match=r"rank 0 waited in the all-gather for module 'a \(forward\)'"):
            engine.module.a(x)
        assert time.monotonic() - start < 10
    else:
        time.sleep(4)  # stays away longer than the timeout, then leaves
