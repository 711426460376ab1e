"""The checkpoint directory protocol under faults: a full disk, damaged files, a crash between the
renames, odd tags. Every rank leaves with the same error; what was saved before stays loadable."""

import json
import os
import shutil
import signal

import pytest
import torch
import torch.distributed as dist

import ds_core
from ds_core import comm
from ds_core.engine.checkpoint import CheckpointError
from ds_core.testing.faults import failing_safetensors_writes, fill_disk, run_python
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

CFG = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
CONFIG = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 0, "seed": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _engine(**over):
    torch.manual_seed(0)
    return ds_core.initialize(model=GPT(CFG), config={**CONFIG, **over})[0]


def _train(engine, step):
    rank = dist.get_rank() if dist.is_initialized() else 0
    x, y = synthetic_tokens(2, CFG.seq_len, CFG.vocab_size, step, rank)
    engine.backward(engine(x, y))
    engine.step()


def _same_everywhere(text: str) -> None:
    texts = comm.all_gather_strings(text)
    assert all(t == texts[0] for t in texts), texts


def _weights(engine):
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


# -- a full disk -----------------------------------------------------------------------------------

@pytest.mark.world_size(2, timeout=120)
def test_full_disk_on_one_rank_fails_every_rank_alike(tmp_path):
    engine = _engine()
    _train(engine, 0)
    engine.save_checkpoint(tmp_path, tag="good")
    good = (tmp_path / "good" / "model.safetensors").read_bytes()
    rank = dist.get_rank()
    # safetensors raises its own SafetensorError on a full disk, only on the rank that hit it
    with failing_safetensors_writes(lambda path: rank == 1 and "rng_rank1" in path):
        with pytest.raises(CheckpointError) as info:
            engine.save_checkpoint(tmp_path, tag="bad")
    text = str(info.value)
    assert "rank 1: no space left on the device writing" in text and "rng_rank1.safetensors" in text
    assert "free on that file system" in text and "save_dir on a file system with room" in text
    assert "previous checkpoint and 'latest' are untouched" in text
    _same_everywhere(text)
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / ".bad.partial").exists() and not (tmp_path / "bad").exists()
    assert (tmp_path / "good" / "model.safetensors").read_bytes() == good
    # ranks that disagree on the tag are told so together, before anything is written
    with pytest.raises(CheckpointError, match="different tags") as info:
        engine.save_checkpoint(tmp_path, tag=f"rank{rank}")
    _same_everywhere(str(info.value))
    _train(engine, 1)  # training goes on, and the next save works
    engine.save_checkpoint(tmp_path, tag="after")
    assert (tmp_path / "latest").read_text() == "after"


@pytest.mark.world_size(2, timeout=120)
def test_real_full_disk_on_a_small_tmpfs(tmpfs):
    engine = _engine()
    _train(engine, 0)
    engine.save_checkpoint(tmpfs, tag="good")
    if dist.get_rank() == 0:
        filler = fill_disk(tmpfs, leave=16 << 10)  # room for the small files, not for the weights
    dist.barrier()
    before = _weights(engine)
    with pytest.raises(CheckpointError) as info:
        engine.save_checkpoint(tmpfs, tag="full")
    text = str(info.value)
    assert "no space left on the device writing" in text and "free on that file system" in text, text
    _same_everywhere(text)
    assert (tmpfs / "latest").read_text() == "good"
    assert not (tmpfs / ".full.partial").exists() and not (tmpfs / "full").exists()
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    _train(engine, 1)
    dist.barrier()
    if dist.get_rank() == 0:
        filler.unlink()
    dist.barrier()
    engine.save_checkpoint(tmpfs, tag="after")
    assert (tmpfs / "latest").read_text() == "after"
    _engine().load_checkpoint(tmpfs, tag="good")  # the old one is intact


# -- damaged files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    engine = _engine()
    _train(engine, 0)
    engine.save_checkpoint(root, tag="t")
    return root


def _flip_last_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(1, 5):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped data bytes": ("model.safetensors", _flip_last_bytes),
    "truncated safetensors header": ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:6])),
    "damaged safetensors header": ("model.safetensors", _damage_header),
    "garbage meta.json": ("meta.json", lambda p: p.write_text("{this is not json")),
    "damaged rng file": ("rng_rank0.safetensors", _damage_header),
    "missing file": ("optimizer.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_is_named_and_nothing_loads(saved, tmp_path, kind):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    name, damage = DAMAGE[kind]
    damage(tmp_path / "t" / name)
    engine = _engine()
    before = _weights(engine)
    with pytest.raises(CheckpointError, match=f"checkpoint .* is damaged: {name} ") as info:
        engine.load_checkpoint(tmp_path)
    assert "load another tag" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    assert engine.global_steps == 0


def test_without_verification_damage_still_names_the_file(saved, tmp_path, monkeypatch):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("DS_CHECKPOINT_VERIFY", "0")
    _flip_last_bytes(tmp_path / "t" / "model.safetensors")
    _engine().load_checkpoint(tmp_path)  # unverified: flipped data bytes are not noticed
    _damage_header(tmp_path / "t" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="optimizer.safetensors is damaged: not a readable safetensors"):
        _engine().load_checkpoint(tmp_path)


def test_meta_json_is_checked_against_its_schema(saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    (tmp_path / "t" / "manifest.json").unlink()  # as saved before manifests: nothing to verify against
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    meta["aliases"] = ["model"]
    (tmp_path / "t" / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="cannot be verified"), \
            pytest.raises(CheckpointError, match=r"meta.json is not a ds checkpoint's meta.json \(aliases"):
        _engine().load_checkpoint(tmp_path)


@pytest.mark.world_size(2, timeout=120)
def test_damaged_file_of_one_rank_fails_every_rank_alike(tmp_path):
    engine = _engine()
    _train(engine, 0)
    engine.save_checkpoint(tmp_path, tag="t")
    if dist.get_rank() == 0:
        _damage_header(tmp_path / "t" / "rng_rank1.safetensors")
    dist.barrier()
    fresh = _engine()
    with pytest.raises(CheckpointError, match="is damaged: rng_rank1.safetensors differs") as info:
        fresh.load_checkpoint(tmp_path)
    _same_everywhere(str(info.value))
    assert fresh.global_steps == 0


# -- a crash between the two renames -----------------------------------------------------------------

_CRASH = """
import os, signal, sys, torch
import ds_core
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens
torch.manual_seed(0)
cfg = GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)
engine = ds_core.initialize(model=GPT(cfg), config={CONFIG})[0]
def step(i):
    x, y = synthetic_tokens(2, 16, 64, i, 0)
    engine.backward(engine(x, y))
    engine.step()
root = os.environ["ROOT"]
step(0)
engine.save_checkpoint(root, tag="t")
step(1)
real = os.replace
def replace(src, dst):
    if str(src).endswith(".t.partial"):  # the old copy is already renamed away
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
engine.save_checkpoint(root, tag="t")
"""


def test_kill_between_the_renames_is_recovered(tmp_path):
    done = run_python(_CRASH.replace("{CONFIG}", repr(CONFIG)), env={"ROOT": str(tmp_path)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert sorted(os.listdir(tmp_path)) == [".t.old", ".t.partial", "latest"]
    engine = _engine()
    with pytest.warns(UserWarning, match=r"interrupted between its two renames; loading the previous complete "
                                         r"copy .*\.t\.old"):
        engine.load_checkpoint(tmp_path)
    assert engine.global_steps == 1
    _train(engine, 1)
    engine.save_checkpoint(tmp_path, tag="t")  # repairs, then replaces
    assert sorted(os.listdir(tmp_path)) == ["latest", "t"]
    assert _engine().load_checkpoint(tmp_path)[0].endswith("/t")


# -- smaller ones ------------------------------------------------------------------------------------

def test_save_latest_false_leaves_latest_alone(tmp_path):
    engine = _engine()
    engine.save_checkpoint(tmp_path, tag="first")
    engine.save_checkpoint(tmp_path, tag="second", save_latest=False)
    assert (tmp_path / "latest").read_text() == "first"
    assert (tmp_path / "second" / "manifest.json").is_file()


@pytest.mark.parametrize("tag", ["a/b", "../up", " ", ".hidden", "latest"])
def test_tag_must_name_one_directory(tmp_path, tag):
    engine = _engine()
    with pytest.raises(CheckpointError, match=f"tag {tag!r} .*a tag names one directory inside save_dir"):
        engine.save_checkpoint(tmp_path, tag=tag)
    assert list(tmp_path.iterdir()) == []


def test_latest_that_is_not_a_tag(tmp_path):
    engine = _engine()
    engine.save_checkpoint(tmp_path, tag="t")
    (tmp_path / "latest").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=r"latest does not hold a tag name .*complete checkpoints there: t"):
        engine.load_checkpoint(tmp_path)


# -- kill -9 of a rank while saving --------------------------------------------------------------------

_KILLED_WHILE_SAVING = """
import os, signal, sys
import torch.distributed as dist
import ds_core
import ds_core.engine.checkpoint_files as files
from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens
ds_core.init_distributed(init_method=sys.argv[1])
engine = ds_core.initialize(model=GPT(GPTConfig(vocab_size=64, seq_len=16, dim=32, layers=2, heads=2)),
                            config={CONFIG})[0]
rank = dist.get_rank()
def step(i):
    x, y = synthetic_tokens(2, 16, 64, i, rank)
    engine.backward(engine(x, y))
    engine.step()
step(0)
engine.save_checkpoint(os.environ["ROOT"], tag="good")
step(1)
real = files.save_file
def save_file(tensors, path, metadata=None):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies in the middle of writing its files
    return real(tensors, path, metadata=metadata)
files.save_file = save_file
engine.save_checkpoint(os.environ["ROOT"], tag="bad")
"""


def test_kill_of_a_rank_while_saving_keeps_the_previous_checkpoint(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "ckpt"
    code = _KILLED_WHILE_SAVING.replace("{CONFIG}", repr(CONFIG))
    env = {**os.environ, "WORLD_SIZE": "2", "ROOT": str(root), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"file://{tmp_path / 'rendezvous'}"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]  # rank 0 learns of the dead peer from gloo
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert (root / "latest").read_text() == "good" and not (root / "bad").exists()
    engine = _engine()
    engine.load_checkpoint(root)  # verified: every file as written
    assert engine.global_steps == 1
    engine.save_checkpoint(root, tag="bad")  # the next save clears what the dead one left
    assert sorted(os.listdir(root)) == ["bad", "good", "latest"]
