"""Async I/O: round trips through the C++ kernel and the pure-Python default, config knobs,
several handles in flight, and clear errors for short/missing files and bad tensors."""

from __future__ import annotations

import pytest
import torch

from ds_core.config.sections import AioConfig
from ds_ops import aio, build


@pytest.fixture(params=["cpp", "python"])
def engine(request, monkeypatch):
    if request.param == "cpp":
        assert build.load("aio") is not None
    else:
        monkeypatch.setattr(aio.build, "load_or_none", lambda name: None)
    cfg = AioConfig(block_size=64 * 1024, queue_depth=2, thread_count=2)
    eng = aio.AsyncIO(cfg)
    yield eng
    eng.shutdown()


@pytest.mark.parametrize("dtype, n", [(torch.float32, 1_000_003), (torch.bfloat16, 4096), (torch.int8, 1)])
def test_round_trip(engine, tmp_path, dtype, n):
    src = (torch.randn(n) * 100).to(dtype)
    path = tmp_path / "t.bin"
    assert engine.write(src, path, fsync=True).wait() == src.nbytes
    assert path.stat().st_size == src.nbytes
    dst = torch.empty_like(src)
    assert engine.read(dst, path).wait() == src.nbytes
    assert torch.equal(dst, src)


def test_offsets_and_overwrite_truncates(engine, tmp_path):
    path = tmp_path / "o.bin"
    a, b = torch.arange(3000, dtype=torch.float32), torch.arange(5000, dtype=torch.float32) + 0.5
    engine.write(torch.zeros(10_000), path).wait()
    engine.write(a, path).wait()  # offset 0 replaces the file
    assert path.stat().st_size == a.nbytes
    engine.write(b, path, offset=8192).wait()  # aligned offset: the O_DIRECT path where allowed
    out = torch.empty_like(b)
    engine.read(out, path, offset=8192).wait()
    assert torch.equal(out, b)
    head = torch.empty(2048)
    engine.read(head, path).wait()
    assert torch.equal(head, a[:2048])


def test_many_handles_in_flight(tmp_path):
    eng = aio.AsyncIO({"block_size": 4096 * 4, "queue_depth": 4, "thread_count": 2, "single_submit": True,
                       "overlap_events": True})
    tensors = [torch.randn(50_000 + i) for i in range(6)]
    handles = [eng.write(t, tmp_path / f"{i}.bin") for i, t in enumerate(tensors)]
    assert [h.wait() for h in handles] == [t.nbytes for t in tensors]
    outs = [torch.empty_like(t) for t in tensors]
    for h in [eng.read(o, tmp_path / f"{i}.bin") for i, o in enumerate(outs)]:
        h.wait()
    assert all(torch.equal(a, b) for a, b in zip(tensors, outs))
    eng.shutdown()


def test_module_level_api(tmp_path):
    t = torch.randn(1234)
    aio.write(t, tmp_path / "m.bin").wait()
    u = torch.empty_like(t)
    h = aio.read(u, tmp_path / "m.bin")
    assert h.wait() == t.nbytes and h.done() and "read" in repr(h)
    assert torch.equal(t, u)


def test_missing_file(engine, tmp_path):
    with pytest.raises(aio.AioError, match="no such file"):
        engine.read(torch.empty(4), tmp_path / "absent.bin")


def test_short_file_and_size_mismatch(engine, tmp_path):
    path = tmp_path / "short.bin"
    engine.write(torch.zeros(100), path).wait()
    with pytest.raises(aio.AioError, match="the file has 400 bytes but the tensor needs 404 bytes"):
        engine.read(torch.empty(101), path)
    with pytest.raises(aio.AioError, match="needs 400 bytes at offset 8"):
        engine.read(torch.empty(100), path, offset=8)


def test_file_shrinking_after_submit_is_an_error_not_garbage(engine, tmp_path, monkeypatch):
    path = tmp_path / "shrink.bin"
    engine.write(torch.ones(10_000), path).wait()
    monkeypatch.setattr(aio, "_check_readable", lambda *a: None)  # the size check passed, then...
    path.write_bytes(b"\0" * 100)  # ...the file was cut short
    with pytest.raises(aio.AioError, match="short read"):
        torch.ops.ds_ops.aio_pread(torch.empty(10_000), str(path), 0, 4096, 2, True)


def test_non_contiguous_and_bad_destination(engine, tmp_path):
    with pytest.raises(aio.AioError, match="not contiguous"):
        engine.write(torch.zeros(8, 8).t(), tmp_path / "nc.bin")
    with pytest.raises(aio.AioError, match="not contiguous"):
        engine.read(torch.zeros(8, 8).t(), tmp_path / "nc.bin")
    handle = engine.write(torch.zeros(8), tmp_path / "no-such-dir" / "x.bin")
    with pytest.raises(OSError, match="no-such-dir"):
        handle.wait()
