"""The NVMe swap pieces on their own (one process): the tensor store over both I/O paths (ds-ops'
kernels and the pure-Python default), errors on a full disk, sub-group optimizer stepping against a
whole-partition step, and the bounded parameter-shard cache."""

import errno
import os

import pytest
import torch

import ds_zero.swap as swap_module
from ds_zero.swap import HEADER_BYTES, SwapError, SwapStore, py_pread, py_pwrite
from ds_zero.swap_optimizer import SwappedOptimizerState, probe_state_keys
from ds_zero.swap_params import ShardSwapper


@pytest.fixture(params=["ops", "python"])
def store(request, tmp_path, monkeypatch):
    """A store using ds-ops' aio ops when installed ("ops"), or the pure-Python default ("python")."""
    if request.param == "python":
        monkeypatch.setattr(swap_module, "get_op", lambda name, default=None: default)
    s = SwapStore(tmp_path, rank=3, kind="test", config_key="offload_optimizer")
    if request.param == "python":
        assert s.write_op is py_pwrite and s.read_op is py_pread
    yield s
    s.close()


def test_round_trip_partial_writes_and_cleanup(store, tmp_path):
    assert not (tmp_path / "ds_zero_swap").exists()  # nothing is created before first use
    store.create("a", 1000, torch.float32)
    store.create("h", 64, torch.bfloat16)
    path = store.path("a")
    assert path.startswith(str(tmp_path / "ds_zero_swap" / "rank3")) and os.path.isfile(path)
    data = torch.randn(1000)
    h = store.write("a", data)
    assert h.wait() == 4000 and os.path.getsize(path) == HEADER_BYTES + 4000
    # a write at element 0 of the payload must not truncate the rest (the header absorbs offset 0)
    store.write("a", torch.full((10,), 7.0), 0).wait()
    store.write("a", torch.full((10,), 9.0), 500).wait()
    out = torch.empty(1000)
    store.read("a", out).wait()
    expected = data.clone()
    expected[:10], expected[500:510] = 7.0, 9.0
    assert torch.equal(out, expected)
    half = torch.randn(64).to(torch.bfloat16)
    store.write("h", half).wait()
    back = torch.empty(64, dtype=torch.bfloat16)
    store.read("h", back).wait()
    assert torch.equal(back, half)
    store.close()
    assert not (tmp_path / "ds_zero_swap").exists()  # files and empty directories removed


def test_wrong_dtype_or_range_is_refused_before_any_io(store):
    store.create("a", 10, torch.float32)
    with pytest.raises(Exception, match="holds contiguous host torch.float32"):
        store.write("a", torch.zeros(4, dtype=torch.float64))
    with pytest.raises(Exception, match=r"holds 10 elements; elements \[8, 12\) are outside it"):
        store.write("a", torch.zeros(4), 8)
    with pytest.raises(Exception, match="was not created"):
        store.read("b", torch.zeros(4))


def test_disk_full_is_a_swap_error_naming_file_bytes_and_fix(store):
    """A real ENOSPC from the kernel: the payload write goes to /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    store.create("a", 256, torch.float32)
    path = store.path("a")
    os.unlink(path)
    os.symlink("/dev/full", path)
    data = torch.randn(256)
    with pytest.raises(SwapError) as info:
        store.write("a", data).wait()
    err = info.value
    assert err.errno == errno.ENOSPC and err.filename == path
    message = str(err)
    assert f"write of 1024 bytes to {path} failed: no space left on device" in message
    assert "offload_optimizer.nvme_path" in message and "bytes free" in message
    assert isinstance(err, OSError)


def test_read_of_a_short_file_is_an_error_not_a_partial_tensor(store):
    store.create("a", 100, torch.float32)
    store.write("a", torch.ones(10)).wait()
    out = torch.zeros(100)
    with pytest.raises(SwapError, match=r"read of 400 bytes from .*test-.*\.a\.swp failed"):
        store.read("a", out).wait()


@pytest.mark.parametrize("name, kwargs", [("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
                                          ("SGD", {"lr": 1e-1, "momentum": 0.9}),
                                          ("Adagrad", {"lr": 1e-1})])
@pytest.mark.parametrize("buffer_count", [1, 2, 3])
def test_sub_group_steps_equal_the_whole_partition_step(tmp_path, name, kwargs, buffer_count):
    cls = getattr(torch.optim, name)
    torch.manual_seed(0)
    sizes = [1000, 37]
    whole = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    ref = cls([{"params": [p]} for p in whole], **kwargs)
    keys, fills = probe_state_keys(lambda groups: cls(groups, **kwargs), {})
    store = SwapStore(tmp_path, 0, "optimizer", "offload_optimizer")
    swapped = SwappedOptimizerState(store, sizes, keys, chunk_numel=300, buffer_count=buffer_count, fills=fills)
    for g, p in enumerate(whole):
        swapped.write_masters(g, p.detach())
    opt = cls([{"params": ps} for ps in swapped.params_by_group()], **kwargs)
    assert [len(c) for c in swapped.params_by_group()] == [4, 1]
    for step in range(4):
        grads = [torch.randn(n) for n in sizes]
        coef = 0.5 if step % 2 else 1.0
        for p, grad in zip(whole, grads):
            p.grad = grad * coef
        ref.step()
        out = [torch.zeros(n) for n in sizes]

        def write_back(g, lo, masters, out=out):
            out[g][lo:lo + masters.numel()].copy_(masters)

        swapped.step(opt, [g.clone() for g in grads], coef, write_back)
        for p, o in zip(whole, out):
            torch.testing.assert_close(o, p.detach(), rtol=0, atol=1e-6)
    assert not any(opt.state.values())  # nothing but files between steps
    # the per-group state dict loads into a plain whole-partition optimizer, and back
    sd = swapped.state_dict(opt)
    assert sorted(sd["state"]) == [0, 1] and all(sd["state"][0][k].numel() == 1000 for k in keys)
    plain = cls([{"params": [torch.nn.Parameter(p.detach().clone())]} for p in whole], **kwargs)
    plain.load_state_dict(sd)
    for k in keys:
        torch.testing.assert_close(plain.state[plain.param_groups[0]["params"][0]][k], ref.state[whole[0]][k])
    swapped.load_state_dict(opt, ref.state_dict())
    assert torch.equal(swapped.masters[0], whole[0].detach())
    swapped.close()


class _Shard:
    """What the shard cache needs of a ShardedParameter."""

    def __init__(self, name, part, offset, file):
        self.name, self.part, self.dtype = name, part, torch.float32
        self.swap_file, self.swap_offset = file, offset
        self._data, self._read, self._clean = None, None, None


def test_shard_cache_is_bounded_prefetches_and_writes_back_changes(tmp_path):
    store = SwapStore(tmp_path, 0, "param", "offload_param")
    cache = ShardSwapper(store, buffer_count=2, buffer_size=100)
    file = cache.add_group(400, torch.float32)
    values = torch.arange(400, dtype=torch.float32)
    cache.write_range(file, values).wait()
    shards = [_Shard(f"p{i}", 100, 100 * i, file) for i in range(4)]
    for s in shards:
        assert torch.equal(cache.load(s), values[s.swap_offset:s.swap_offset + 100])
        assert len(cache.resident) <= 2
    cache.prefetch(shards[0])
    assert shards[0]._read is not None and len(cache.resident) == 2
    assert torch.equal(cache.load(shards[0]), values[:100])
    cache.load(shards[1]).fill_(-1.0)  # changed in memory ...
    cache.load(shards[2])
    cache.load(shards[3])  # ... and evicted: written back first
    assert shards[1]._data is None
    assert torch.equal(cache.load(shards[1]), torch.full((100,), -1.0))
    with pytest.raises(Exception, match=r"offload_param.buffer_size 100 is smaller than the shard of parameter "
                                        r"big \(101 elements"):
        cache.check(_Shard("big", 101, 0, file))
    store.close()


def test_a_failed_write_back_keeps_the_shard_in_memory(tmp_path):
    store = SwapStore(tmp_path, 0, "param", "offload_param")
    cache = ShardSwapper(store, buffer_count=1, buffer_size=100)
    file = cache.add_group(100, torch.float32)
    cache.write_range(file, torch.zeros(100)).wait()
    s = _Shard("p", 100, 0, file)
    cache.load(s).fill_(3.0)

    def disk_full(src, path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    store.write_op = disk_full
    with pytest.raises(SwapError, match="no space left on device"):
        cache.evict(s)
    assert s._data is not None and bool((s._data == 3.0).all())  # not discarded: the write failed
    store.close()
