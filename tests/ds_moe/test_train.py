"""A GPT with MoE feed-forward layers trains on 2 ranks and reloads under ep_size 1 <-> 2.

``check_training_and_reload`` takes the ZeRO stage (``None``: no ``zero_optimization`` section); the
ZeRO-2 composition runs it from tests/integration, where ds-zero is installed too.
"""

import torch
import torch.distributed as dist

import ds_core
from ds_core.testing.models import synthetic_tokens

from ._gpt import CFG, make

MOE = {"num_experts": 4, "k": 2, "capacity_factor": 1.25, "min_capacity": 2}
CONF = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def _batch(step, rank):
    return synthetic_tokens(4, CFG.seq_len, CFG.vocab_size, step % 2, rank)  # two batches: the loss must fall


def _config(stage):
    return dict(CONF) if stage is None else {**CONF, "zero_optimization": {"stage": stage}}


def _run(stage, ep, steps, first=0, engine=None):
    if engine is None:
        model = make(ep_size=ep, **MOE)
        engine, *_ = ds_core.initialize(model=model, config=_config(stage))
    torch.manual_seed(100)  # same routing noise (RTS, 2nd-expert sampling) in every run
    losses = []
    for step in range(first, first + steps):
        loss = engine(*_batch(step, dist.get_rank() if dist.is_initialized() else 0))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


def _expert_state(engine) -> dict:
    """What must survive a same-layout reload: ZeRO's last master partition, else the module."""
    masters = getattr(engine.optimizer, "masters", None)
    if isinstance(masters, list):
        return {"master": masters[-1].detach().clone()}
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def _train_and_save(path, stage):
    steps = 12
    trained, engine = _run(stage, 2, steps)
    plain, _ = _run(None, 2, 4)
    engine.save_checkpoint(path, tag="ep2")
    state = {k: v.clone() for k, v in engine.module.state_dict().items()}
    _, again = _run(stage, 2, 0)  # same layout: optimizer state follows
    again.load_checkpoint(path, tag="ep2")
    return trained, plain, state, _expert_state(again), _expert_state(engine)


def _load_ep1_checkpoint(path, stage):
    _, engine = _run(stage, 2, 0)
    engine.load_checkpoint(path, tag="ep1", load_optimizer_states=False)
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def check_training_and_reload(distributed, tmp_path, stage):
    results = distributed.run(_train_and_save, 2, args=(str(tmp_path), stage))
    for rank, (trained, plain, _, reloaded, saved) in enumerate(results):
        assert sum(trained[-3:]) / 3 < 0.8 * sum(trained[:3]) / 3, (rank, trained)  # the loss falls
        assert max(abs(a - b) for a, b in zip(trained[:4], plain)) < 1e-4, (trained, plain)  # == no ZeRO
        assert reloaded.keys() == saved.keys()
        assert all(torch.equal(reloaded[k], saved[k]) for k in saved)  # same layout reloads exactly

    # ep_size 2 (2 ranks) -> ep_size 1 (1 process): every expert comes from its rank's file
    losses, single = _run(stage, 1, 0)
    try:
        single.load_checkpoint(tmp_path, tag="ep2")
        raise AssertionError("optimizer state must not follow experts to another layout")
    except ds_core.engine.checkpoint.CheckpointError as exc:
        assert "load_optimizer_states=False" in str(exc)
    single.load_checkpoint(tmp_path, tag="ep2", load_optimizer_states=False)
    merged = {**results[0][2], **results[1][2]}
    loaded = single.module.state_dict()
    assert set(loaded) == set(merged)
    for k, v in loaded.items():
        assert torch.equal(v, merged[k]), k
    after, _ = _run(stage, 1, 2, first=20, engine=single)  # and it keeps training
    single.save_checkpoint(tmp_path, tag="ep1")
    state = {k: v.clone() for k, v in single.module.state_dict().items()}

    # ep_size 1 -> ep_size 2: each rank takes its experts
    for rank, part in enumerate(distributed.run(_load_ep1_checkpoint, 2, args=(str(tmp_path), stage))):
        for k, v in part.items():
            assert torch.equal(v, state[k]), (rank, k)
        assert sum(".experts.experts." in k for k in part) == sum(".experts.experts." in k for k in state) // 2


def test_moe_gpt_trains_and_reloads_across_expert_layouts(distributed, tmp_path):
    check_training_and_reload(distributed, tmp_path, stage=None)
