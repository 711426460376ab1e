"""The watchdog names a rank that stopped (SIGSTOP) at ZeRO stages 0-2, instead of the job hanging until
the process-group timeout. Real processes: rank 1 stops itself in the middle of training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TRAIN = """
import os, signal, sys
import torch.distributed as dist
import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens
stage = int(sys.argv[1])
ds_core.init_distributed(init_method=sys.argv[2])
config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
if stage:
    config["zero_optimization"] = {"stage": stage}
engine = ds_core.initialize(model=GPT(GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)),
                            config=config)[0]
rank = dist.get_rank()
for step in range(1000):
    if step == 2 and rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped, not dead: its sockets stay open
    x, y = synthetic_tokens(2, 16, 64, step, rank)
    engine.backward(engine(x, y))
    engine.step()
"""


def _launch(tmp_path, stage):
    env = {**os.environ, "WORLD_SIZE": "2", "DS_WATCHDOG_TIMEOUT": "4", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    init = f"file://{tmp_path / 'rendezvous'}"
    return [subprocess.Popen([sys.executable, "-c", TRAIN, str(stage), init], env={**env, "RANK": str(r),
                             "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in range(2)]


@pytest.mark.parametrize("stage", [0, 2])
def test_stopped_rank_is_named_within_the_watchdog_timeout(tmp_path, stage):
    procs = _launch(tmp_path, stage)
    try:
        code = procs[0].wait(timeout=300)  # without the watchdog: the 30-minute process-group timeout
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    from ds_core.comm.watchdog import EXIT_CODE

    assert code == EXIT_CODE, err[-3000:]
    assert "[ds watchdog] rank 0" in err and "rank 1 has not answered for" in err, err[-3000:]
    assert "stopped (SIGSTOP" in err and "DS_WATCHDOG_TIMEOUT" in err
    assert "waits in the collective" in err or "waits for an asynchronous collective" in err, err[-3000:]
