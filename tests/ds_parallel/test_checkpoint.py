"""Tensor-parallel engine checkpoints: per-shard files that reload exactly under the same
``autotp_size`` (training continues bit-identically) and load at tensor-parallel size 1.

2 ranks, ``tensor_parallel: {"autotp_size": 2}``: train 3 steps, save, train 2 more (the reference
continuation); a fresh engine loads the checkpoint and trains the same 2 steps — losses equal
exactly. The same checkpoint then loads into the unsharded model on one process
(``ds_parallel.load_tp_checkpoint``), whose logits equal the sharded model's (1e-5).
"""

import copy

import pytest
import torch

from ds_core.testing.harness import run_distributed
from ds_parallel import load_tp_checkpoint
from ds_parallel.checkpoint import parse_shard_key

from ._train import build, engine_losses

RUNS = {"gpt-fp32": ("gpt", {}), "llama_kv3-fp32": ("llama_kv3", {}), "gpt-bf16": ("gpt", {"bf16": {"enabled": True}})}
IDS = torch.arange(16).remainder(7).view(2, 8)


def _config(extra):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5, "steps_per_print": 0,
            "tensor_parallel": {"autotp_size": 2}, **extra}


def _logits(kind, engine):
    """fp32 logits of the saved weights (a bf16 model's weights cast up, so both sides compute alike)."""
    model = copy.deepcopy(engine.module).float().eval()
    with torch.no_grad():
        return model(IDS) if kind == "gpt" else model(input_ids=IDS).logits


def _save_and_resume(root):
    out = {}
    for name, (kind, extra) in RUNS.items():
        path = f"{root}/{name}"
        _, engine = engine_losses(kind, _config(extra), steps=3)
        engine.save_checkpoint(path, tag="step3")
        logits = _logits(kind, engine)
        cont, _ = _continue(kind, extra, engine)
        _, fresh = engine_losses(kind, _config(extra), steps=0)
        fresh.load_checkpoint(path, tag="step3")
        resumed, _ = _continue(kind, extra, fresh)
        out[name] = {"continued": cont, "resumed": resumed, "logits": logits,
                     "keys": [k for k in engine.module.state_dict() if "#" in k]}
    return out


def _continue(kind, extra, engine):
    from ._train import batch, loss_of

    losses = []
    for step in range(3, 5):
        tokens, targets = batch(step)
        loss = loss_of(kind, engine, tokens, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    return root, run_distributed(_save_and_resume, 2, args=(str(root),), timeout=600)


@pytest.mark.parametrize("name", list(RUNS))
def test_same_size_reload_continues_exactly(saved, name):
    for rank in saved[1]:
        assert rank[name]["resumed"] == rank[name]["continued"]


@pytest.mark.parametrize("name", list(RUNS))
def test_shards_are_saved_under_self_describing_keys(saved, name):
    keys = saved[1][1][name]["keys"]
    assert keys and all(parse_shard_key(k) is not None for k in keys)
    assert any(parse_shard_key(k).rank == 1 for k in keys)


@pytest.mark.parametrize("name", list(RUNS))
def test_tp2_checkpoint_loads_at_tp1(saved, name):
    root, ranks = saved
    kind, extra = RUNS[name]
    model = build(kind, seed=123)  # other weights: everything must come from the checkpoint
    if "bf16" in extra:
        model = model.to(torch.bfloat16)
    load_tp_checkpoint(model, f"{root}/{name}")
    model = model.float().eval()
    with torch.no_grad():
        logits = model(IDS) if kind == "gpt" else model(input_ids=IDS).logits
    torch.testing.assert_close(logits, ranks[0][name]["logits"], rtol=1e-5, atol=1e-5)
