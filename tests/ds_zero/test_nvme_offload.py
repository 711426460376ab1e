"""ZeRO-Infinity NVMe offload against plain PyTorch DDP (2 gloo ranks, tiny GPT, swap files in tmp_path).

Tolerance: fp32 losses equal to DDP's to 1e-5 (absolute) over 20 steps, AdamW with clipping — the
sub-group stepping must compute what the whole-partition CPU-offload step computes.
"""

import copy
import errno
import os

import pytest
import torch
import torch.distributed as dist

import ds_core

from ._train import config, ddp_losses, engine_losses, make_model, max_diff, train

# small buffers, so the 15k-element partitions are stepped in several sub-groups and several
# parameter shards are swapped in and out per forward
OPT = {"device": "nvme", "buffer_count": 3, "buffer_size": 6_000}
PARAM = {"device": "nvme", "buffer_count": 4, "buffer_size": 4_096}


def _swap_files(path) -> list[str]:
    root = os.path.join(path, "ds_zero_swap", f"rank{dist.get_rank()}")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.mark.world_size(2)
def test_stage3_nvme_param_and_optimizer_match_ddp(tmp_path):
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 20)
    nvme = str(tmp_path)
    ours, engine = engine_losses(copy.deepcopy(model), 20, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 40, "overlap_comm": True,
        "offload_param": {**PARAM, "nvme_path": nvme}, "offload_optimizer": {**OPT, "nvme_path": nvme}})
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    opt, parts = engine.optimizer, engine.optimizer.parts
    assert len(opt.swapped.chunks) > 3 and opt.swapped.keys == ["exp_avg", "exp_avg_sq"]
    assert all(g.flat.numel() == 0 for g in parts.groups)  # no flat shard tensor in memory
    assert len(parts.swap.resident) <= PARAM["buffer_count"]
    assert not any(opt.optimizer.state.values())  # optimizer state lives in the files between steps
    files = _swap_files(nvme)
    assert any(f.startswith("param-") for f in files) and any(f.startswith("optimizer-") for f in files)
    opt.close()
    assert _swap_files(nvme) == []


@pytest.mark.world_size(2)
def test_stage2_nvme_optimizer_matches_ddp_and_cpu_offload(tmp_path):
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 20)
    ours, engine = engine_losses(copy.deepcopy(model), 20, zero_optimization={
        "stage": 2, "overlap_comm": True, "offload_optimizer": {**OPT, "nvme_path": str(tmp_path)}})
    assert max_diff(ours, ref) < 1e-5, (ours, ref)
    cpu, _ = engine_losses(copy.deepcopy(model), 20, zero_optimization={
        "stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}})
    assert max_diff(ours, cpu) < 1e-6, (ours, cpu)
    engine.optimizer.close()


@pytest.mark.world_size(2)
def test_stage1_bf16_nvme_optimizer_equals_cpu_offload(tmp_path):
    """bf16 model, fp32 masters on NVMe: the same numbers as CPU offload's host masters."""
    model = make_model()
    nvme, _ = engine_losses(copy.deepcopy(model), 6, bf16={"enabled": True}, zero_optimization={
        "stage": 1, "offload_optimizer": {**OPT, "nvme_path": str(tmp_path)}})
    cpu, _ = engine_losses(copy.deepcopy(model), 6, bf16={"enabled": True}, zero_optimization={
        "stage": 1, "offload_optimizer": {"device": "cpu"}})
    assert max_diff(nvme, cpu) < 1e-6, (nvme, cpu)


@pytest.mark.world_size(2)
def test_nvme_checkpoint_round_trip_and_cpu_offload_interchange(tmp_path):
    nvme = str(tmp_path / "nvme")
    os.makedirs(nvme, exist_ok=True)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 40,
            "offload_param": {**PARAM, "nvme_path": nvme}, "offload_optimizer": {**OPT, "nvme_path": nvme}}
    model = make_model()
    full, _ = engine_losses(copy.deepcopy(model), 8, zero_optimization=zero)
    engine, *_ = ds_core.initialize(model=copy.deepcopy(model), config=config(zero_optimization=zero))
    train(engine, 5)
    engine.save_checkpoint(tmp_path / "ckpt", tag="five")
    engine.optimizer.close()
    # the same layout resumes bit-identically under NVMe offload ...
    resumed, *_ = ds_core.initialize(model=make_model(seed=1), config=config(zero_optimization=zero))
    resumed.load_checkpoint(tmp_path / "ckpt", tag="five")
    assert train(resumed, 3, first_step=5) == full[5:]
    resumed.optimizer.close()
    # ... and under CPU offload (the checkpoint has CPU offload's per-group layout)
    cpu_zero = {**zero, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
    cpu, *_ = ds_core.initialize(model=make_model(seed=1), config=config(zero_optimization=cpu_zero))
    cpu.load_checkpoint(tmp_path / "ckpt", tag="five")
    assert max_diff(train(cpu, 3, first_step=5), full[5:]) < 1e-6


@pytest.mark.world_size(2)
def test_disk_full_during_swap_out_names_the_file_and_last_checkpoint_loads(tmp_path):
    from ds_zero.swap import SwapError

    nvme = str(tmp_path / "nvme")
    os.makedirs(nvme, exist_ok=True)
    zero = {"stage": 2, "offload_optimizer": {**OPT, "nvme_path": nvme}}
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 5)
    engine, *_ = ds_core.initialize(model=copy.deepcopy(model), config=config(zero_optimization=zero))
    train(engine, 3)
    engine.save_checkpoint(tmp_path / "ckpt", tag="three")
    store = engine.optimizer.swapped.store

    def disk_full(src, path, offset, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    if dist.get_rank() == 1:  # only rank 1's disk is full: rank 0 must not wait for it forever
        store.write_op = disk_full
        with pytest.raises(SwapError, match=r"write of \d+ bytes to .*rank1/optimizer-.*\.swp failed: no space "
                                            r"left on device") as info:
            train(engine, 1, first_step=3)
        assert info.value.errno == errno.ENOSPC and "nvme_path" in str(info.value)
        assert "reload the last checkpoint" in str(info.value)
    else:
        with pytest.raises(SwapError, match=r"failed on data-parallel rank\(s\) \[1\].*reload the last checkpoint"):
            train(engine, 1, first_step=3)
    engine.optimizer.close()
    resumed, *_ = ds_core.initialize(model=make_model(seed=1), config=config(zero_optimization=zero))
    resumed.load_checkpoint(tmp_path / "ckpt", tag="three")
    assert max_diff(train(resumed, 2, first_step=3), ref[3:]) < 1e-5
    resumed.optimizer.close()


@pytest.mark.world_size(2)
def test_after_a_failed_nvme_step_saving_is_refused_until_a_checkpoint_is_loaded(tmp_path):
    """A step that failed part-way left some masters updated and the optimizer state behind: that
    state is never saved; loading the last checkpoint makes the engine usable again."""
    from ds_core.engine.checkpoint import CheckpointError
    from ds_zero.swap import SwapError

    nvme = str(tmp_path / "nvme")
    os.makedirs(nvme, exist_ok=True)
    zero = {"stage": 2, "offload_optimizer": {**OPT, "nvme_path": nvme}}
    model = make_model()
    ref = ddp_losses(copy.deepcopy(model), 5)
    engine, *_ = ds_core.initialize(model=copy.deepcopy(model), config=config(zero_optimization=zero))
    train(engine, 3)
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(ckpt, tag="three")
    store = engine.optimizer.swapped.store
    write = store.write_op

    def disk_full(src, path, offset, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    if dist.get_rank() == 1:
        store.write_op = disk_full
    with pytest.raises(SwapError):
        train(engine, 1, first_step=3)
    store.write_op = write
    with pytest.raises(CheckpointError, match=r"cannot save: optimizer step 4 failed \(SwapError: .*\) after it had "
                                              r"started updating weights.*load the last good checkpoint"):
        engine.save_checkpoint(ckpt, tag="broken")
    assert not (ckpt / "broken").exists() and (ckpt / "latest").read_text() == "three"
    with pytest.raises(ds_core.errors.DSError, match="cannot step"):
        train(engine, 1, first_step=3)
    engine.load_checkpoint(ckpt, tag="three")
    assert max_diff(train(engine, 2, first_step=3), ref[3:]) < 1e-5
    engine.save_checkpoint(ckpt, tag="five")  # usable again
    engine.optimizer.close()


@pytest.mark.world_size(2)
def test_prefetch_and_gathered_parameters_modify_on_nvme_shards(tmp_path):
    from ds_zero import GatheredParameters

    nvme = str(tmp_path)
    engine, *_ = ds_core.initialize(model=make_model(), config=config(zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "offload_param": {**PARAM, "nvme_path": nvme}, "offload_optimizer": {"device": "cpu"}}))
    parts = engine.optimizer.parts
    s = parts.by_param[id(engine.module.tok.weight)]
    parts.swap.drop_all()
    assert s._data is None
    s.prefetch()
    assert s._read is not None or s._data is not None  # a read is in flight (or already done)
    expected = make_model().tok.weight.detach().reshape(-1)[s.rank * s.part:(s.rank + 1) * s.part]
    assert torch.equal(s.shard[:expected.numel()], expected)
    w = engine.module.tok.weight
    with GatheredParameters([w], modifier_rank=0):
        if dist.get_rank() == 0:
            with torch.no_grad():
                w.fill_(0.25)
    parts.swap.drop_all()  # the change must be in the file, not only in memory
    with GatheredParameters(w):
        assert bool((w == 0.25).all())
    assert bool((engine.optimizer.masters[0][:s.part] == parts.groups[0].read_own()[:s.part]).all())
    engine.optimizer.close()
