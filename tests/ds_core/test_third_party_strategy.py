"""A data-parallel strategy from a third-party package replaces the engine's, and only it.

The strategy lives in tests/ds_core/plugins/ds-test-strategy (installed by the nox sessions, registered
through the ``ds.features`` entry point, written against ds-core alone): parameters, gradients and
optimizer state sharded over the data axis, ZeRO-3 style. Compared with the engine's stage 0 on the
same model and data (2 gloo ranks, fp32, AdamW with clipping): losses equal to 1e-5 — the same
update, computed from shards. Its checkpoints go through the engine's layout and directory protocol.
"""

import importlib.util

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ds_test_strategy") is None,
                                reason="pip install tests/ds_core/plugins/ds-test-strategy")

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "steps_per_print": 0, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}}
SHARDED = {**BASE, "test_sharded_strategy": {}}


def _engine(config, seed=0):
    torch.manual_seed(seed)
    return ds_core.initialize(model=GPT(CFG), config=config)[0]


def _train(engine, steps, first=0):
    losses = []
    for step in range(first, first + steps):
        total = 0.0
        for m in range(engine.gradient_accumulation_steps()):
            loss = engine(*synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, 2 * step + m, dist.get_rank()))
            engine.backward(loss)
            engine.step()
            total += loss.item() / 2
        losses.append(total)
    return losses


@pytest.mark.world_size(2)
def test_a_third_party_sharded_strategy_trains_like_stage_0_and_checkpoints(tmp_path):
    from ds_test_strategy import ShardedStrategy

    ref = _train(_engine(BASE), 6)
    engine = _engine(SHARDED)
    assert isinstance(engine.strategy, ShardedStrategy) and engine.optimizer is engine.strategy
    ours = _train(engine, 3)
    # between steps a rank holds only its shards: the parameters' data is empty
    assert all(p.numel() == 0 for p in engine.module.parameters())
    shard_elems = sum(s.numel() for s in engine.strategy.shards)
    assert shard_elems * 2 >= sum(p.numel() for p in GPT(CFG).parameters()) > (shard_elems - 64) * 2
    engine.save_checkpoint(tmp_path, tag="three")
    ours += _train(engine, 3, first=3)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5, (ours, ref)

    resumed = _engine(SHARDED, seed=1)  # other initial weights
    resumed.load_checkpoint(tmp_path, tag="three")
    assert resumed.global_steps == 3
    assert _train(resumed, 3, first=3) == ours[3:]

    # a stage-0 checkpoint loads its weights into the sharded strategy (each rank takes its shards)
    stage0 = _engine(BASE, seed=2)
    _train(stage0, 1)
    stage0.save_checkpoint(tmp_path, tag="stage0")
    with pytest.raises(ds_core.engine.checkpoint.CheckpointError, match="layout 'replicated'.*expects layout "
                                                                         "'test-sharded'"):
        resumed.load_checkpoint(tmp_path, tag="stage0")
    resumed.load_checkpoint(tmp_path, tag="stage0", load_optimizer_states=False)
    x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, 99, 0)
    with torch.no_grad():
        assert abs(float(resumed(x, y)) - float(stage0(x, y))) < 1e-6
