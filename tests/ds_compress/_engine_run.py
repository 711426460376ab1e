"""Compression training through the ds-core engine, checked against a plain PyTorch loop.

Each rank builds the same GPT, the engine's ``model_wrapper`` (ds_compress.engine.build) prepares it
from the config's ``compression_training`` section, and the schedule follows ``engine.global_steps``.
The reference is one process running ``init_compression`` and a plain AdamW loop on the global
batch (both ranks' micro-batches), stepping the schedule by hand: parameters must agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import _gpt

STEPS = 5
MICRO = 4
SECTION = {
    "weight_quantization": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "quantize_groups": 64},
                            "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8},
                                                         "modules": [r"attn\.[qkv]"]}}},
    "sparse_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 3, "method": "l1"},
                       "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["fc"]}}},
}


def _model():
    torch.manual_seed(0)
    return _gpt.GPT(_gpt.Cfg(layers=1, dim=32, heads=2, mlp=64))


def _batch(step: int, rank: int):
    return _gpt.batch(MICRO, 100 * step + rank)


def engine_run(stage: int | None, world: int = 2):
    import ds_core

    config = {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
              "compression_training": SECTION}
    if stage is not None:
        config["zero_optimization"] = {"stage": stage}
    engine, *_ = ds_core.initialize(model=_model(), config=config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    bits = []
    for step in range(STEPS):
        x, y = _batch(step, rank)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        fc = engine.module.blocks[0].fc
        bits.append((engine.module.blocks[0].attn.q.wq_bits, fc.sparse_on))
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return bits, state


def reference_run(world: int = 2):
    import ds_compress

    model = ds_compress.init_compression(_model(), {"compression_training": SECTION})
    scheduler = ds_compress.compression_scheduler(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        xs, ys = zip(*(_batch(step, r) for r in range(world)))
        loss = model(torch.cat(xs), torch.cat(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check(results, world: int = 2) -> None:
    reference = reference_run(world)
    for bits, state in results:
        # the state each forward ran in: quantization from step 2, pruning from step 3 (global_steps)
        assert bits == [(None, False), (None, False), (8, False), (8, True), (8, True)], bits
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            if key.endswith("attn.k.bias"):
                # its gradient is zero up to rounding (softmax ignores a shift shared by all keys), and
                # Adam turns rounding noise into full-size steps: no two summation orders agree on it
                continue
            assert torch.allclose(state[key].float(), value.float(), atol=2e-5, rtol=1e-4), key
    masks = [state["blocks.0.fc.sparse_mask"] for _, state in results]
    assert all(torch.equal(m, masks[0]) for m in masks) and float(masks[0].mean()) == 0.5
