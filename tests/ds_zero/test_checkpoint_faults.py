"""ZeRO checkpoints under faults: the same directory protocol as stage 0, so a full disk on one rank
fails every rank alike, and a crash never leaves ``latest`` naming a checkpoint without its files."""

import os
import signal

import pytest
import torch.distributed as dist

import ds_core
from ds_core import comm
from ds_core.engine.checkpoint import CheckpointError
from ds_core.testing.faults import failing_safetensors_writes, run_python

from ._train import config, make_model, train


@pytest.mark.world_size(2, timeout=120)
def test_zero2_full_disk_on_one_rank_fails_every_rank_alike(tmp_path):
    engine = ds_core.initialize(model=make_model(), config=config(stage=2))[0]
    train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="good")
    rank = dist.get_rank()
    with failing_safetensors_writes(lambda path: rank == 1 and path.endswith("zero_rank1.safetensors")):
        with pytest.raises(CheckpointError) as info:
            engine.save_checkpoint(tmp_path, tag="bad")
    text = str(info.value)
    assert "rank 1: no space left on the device writing" in text and "zero_rank1.safetensors" in text, text
    assert "free on that file system" in text
    texts = comm.all_gather_strings(text)
    assert texts[0] == texts[1]
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / ".bad.partial").exists() and not (tmp_path / "bad").exists()
    train(engine, 1, first_step=1)
    engine.save_checkpoint(tmp_path, tag="after")
    fresh = ds_core.initialize(model=make_model(seed=1), config=config(stage=2))[0]
    fresh.load_checkpoint(tmp_path)
    assert fresh.global_steps == 2


_CRASH_16BIT = """
import os, signal
import ds_core
import safetensors.torch
from tests.ds_zero._train import config, make_model, train
zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
engine = ds_core.initialize(model=make_model(), config=config(zero_optimization=zero))[0]
train(engine, 1)
engine.save_checkpoint(os.environ["ROOT"], tag="a")
train(engine, 1, first_step=1)
real = safetensors.torch.save_file
def save_file(tensors, path, metadata=None):
    if "model_16bit" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # the machine dies while the consolidated file is written
    return real(tensors, path, metadata=metadata)
import sys
for m in list(sys.modules.values()):
    if getattr(m, "save_file", None) is real:
        m.save_file = save_file
engine.save_checkpoint(os.environ["ROOT"], tag="b")
"""


def test_stage3_16bit_file_is_inside_the_protocol(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = run_python(_CRASH_16BIT, env={"ROOT": str(tmp_path)}, cwd=root)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    latest = (tmp_path / "latest").read_text()
    assert latest == "a"  # the interrupted save never became the latest
    assert (tmp_path / latest / "model_16bit.safetensors").is_file()
    assert not (tmp_path / "b").exists()
