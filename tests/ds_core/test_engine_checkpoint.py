"""Engine checkpoints: exact resume, atomic writes, and clear errors for mismatches."""

import json
import os

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core.engine.checkpoint import CheckpointError
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2, dropout=0.1)


def _config(**over):
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 0,
            "gradient_clipping": 1.0, "seed": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 5}}}
    base.update(over)
    return base


def _train(engine, start, steps):
    rank = dist.get_rank() if dist.is_initialized() else 0
    losses = []
    for step in range(start, start + steps):
        for m in range(engine.gradient_accumulation_steps()):
            x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step * 10 + m, rank)
            loss = engine(x, y)  # dropout draws from the RNG: resume must restore it
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


def _fresh_engine(**over):
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=GPT(CFG), config=_config(**over))
    return engine


@pytest.mark.world_size(2)
def test_resume_is_bit_identical_fp32(tmp_path):
    _resume_with_lr_check(tmp_path)


@pytest.mark.world_size(2)
def test_resume_is_bit_identical_bf16(tmp_path):
    _resume_with_lr_check(tmp_path, bf16={"enabled": True})


def _resume_with_lr_check(tmp_path, **over):
    engine = _fresh_engine(**over)
    _train(engine, 0, 3)
    lr_at_save = engine.get_lr()
    engine.save_checkpoint(tmp_path, client_state={"epoch": 7, "cursor": torch.tensor([3, 4])})
    uninterrupted = _train(engine, 3, 4)
    resumed = _fresh_engine(**over)
    path, client = resumed.load_checkpoint(tmp_path)
    assert path.endswith("global_step3") and client["epoch"] == 7
    assert torch.equal(client["cursor"], torch.tensor([3, 4]))
    assert resumed.global_steps == 3 and resumed.get_lr() == lr_at_save
    assert _train(resumed, 3, 4) == uninterrupted


def test_layout_on_disk(tmp_path):
    engine = _fresh_engine()
    _train(engine, 0, 1)
    engine.save_checkpoint(tmp_path, tag="first")
    assert (tmp_path / "latest").read_text() == "first"
    files = sorted(os.listdir(tmp_path / "first"))
    assert files == ["client.safetensors", "manifest.json", "meta.json", "model.safetensors",
                     "optimizer.safetensors", "rng_rank0.json", "rng_rank0.safetensors"]
    meta = json.loads((tmp_path / "first" / "meta.json").read_text())
    assert meta["global_steps"] == 1 and meta["world_size"] == 1 and meta["config"]["seed"] == 1


def test_unwritable_dir_fails_before_state_changes(tmp_path):
    engine = _fresh_engine()
    _train(engine, 0, 1)
    engine.save_checkpoint(tmp_path / "ckpt", tag="good")
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot write checkpoint directory .*choose a writable save_dir"):
        engine.save_checkpoint(blocker / "sub", tag="bad")
    assert engine.global_steps == 1
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    assert (tmp_path / "ckpt" / "latest").read_text() == "good"


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    engine = _fresh_engine()
    _train(engine, 0, 1)
    engine.save_checkpoint(tmp_path, tag="same")
    good = (tmp_path / "same" / "model.safetensors").read_bytes()
    _train(engine, 1, 1)
    import ds_core.engine.checkpoint as ck

    real = ck.tensors_to_safetensors

    def disk_full(tensors, path):
        if path.name == "optimizer.safetensors":
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ck, "tensors_to_safetensors", disk_full)
    with pytest.raises(CheckpointError, match="no space left on the device.*previous checkpoint and 'latest' are untouched"):
        engine.save_checkpoint(tmp_path, tag="same")
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == good
    assert not (tmp_path / ".same.partial").exists()
    monkeypatch.setattr(ck, "tensors_to_safetensors", real)
    _fresh_engine().load_checkpoint(tmp_path)  # still loadable


def test_loading_a_different_model_lists_mismatches(tmp_path):
    engine = _fresh_engine()
    engine.save_checkpoint(tmp_path)
    other_cfg = GPTConfig(vocab_size=64, seq_len=16, dim=48, layers=1, heads=2)
    other, *_ = ds_core.initialize(model=GPT(other_cfg), config=_config())
    with pytest.raises(CheckpointError) as info:
        other.load_checkpoint(tmp_path)
    text = str(info.value)
    assert "not in the model (" in text and "blocks.1.ln1.bias" in text
    assert "shape mismatches" in text and "blocks.0.proj.weight: checkpoint (32, 32) vs model (48, 48)" in text


def test_missing_checkpoint(tmp_path):
    engine = _fresh_engine()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        engine.load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist or is incomplete"):
        engine.load_checkpoint(tmp_path, tag="nope")


def test_client_state_must_be_json_or_tensors(tmp_path):
    engine = _fresh_engine()
    with pytest.raises(CheckpointError, match="client_state must hold tensors and JSON values"):
        engine.save_checkpoint(tmp_path, client_state={"bad": object()})
