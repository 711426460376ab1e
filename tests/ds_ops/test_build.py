"""JIT builds: cache key and location, one warning and the default when no build is possible,
an unwritable cache dir, a corrupt cached build rebuilt, the file lock and ``ds ops build``."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings

import pytest
import torch

from ds_ops import build
from ds_ops.cpu_optim import _adam_default


def _adam_args(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [p, grad, torch.zeros(n), torch.zeros(n), None, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1, True]


def test_isa_and_flags():
    assert build.cpu_isa() in ("avx512", "avx2", "generic")
    assert "-mavx512f" in build.isa_flags("avx512")
    assert build.isa_flags("avx2")[0] == "-mavx2"
    assert build.isa_flags("generic") == []


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_OPS_CACHE", str(tmp_path / "c"))
    assert build.cache_root() == tmp_path / "c"
    monkeypatch.delenv("DS_OPS_CACHE")
    assert build.cache_root().parts[-2:] == (".cache", "ds_ops")


def test_no_compiler_warns_once_and_runs_the_default(monkeypatch, fresh_build):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert build.describe("cpu_optim").startswith("unavailable: no C++ compiler")
    args, expect = _adam_args(), _adam_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.ops.ds_ops.adam_step(*args)
        torch.ops.ds_ops.adam_step(*_adam_args())
    mine = [w for w in caught if issubclass(w.category, build.BuildWarning)]
    assert len(mine) == 1 and "no C++ compiler" in str(mine[0].message)
    assert "pure-PyTorch" in str(mine[0].message)
    _adam_default(*expect)
    assert torch.equal(args[0], expect[0])
    assert build.describe("cpu_optim").startswith("failed: no C++ compiler")


def test_jit_can_be_switched_off(monkeypatch, fresh_build):
    monkeypatch.setenv("DS_OPS_JIT", "0")
    with pytest.raises(build.BuildError, match="DS_OPS_JIT=0"):
        build.load("cpu_optim")


def test_unwritable_cache_dir_names_dir_and_env(monkeypatch, tmp_path, fresh_build):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DS_OPS_CACHE", str(blocker / "cache"))
    with pytest.raises(build.BuildError, match=r"cache dir .*a-file/cache is not writable.*DS_OPS_CACHE"):
        build.load("aio")
    build.reset()
    with pytest.warns(build.BuildWarning, match="DS_OPS_CACHE"):
        assert build.load_or_none("aio") is None


def test_corrupt_cached_build_is_rebuilt(tmp_path, monkeypatch, fresh_build):
    build.load("aio")
    _, built_dir = build._paths("aio")
    # Corrupt a copy in another cache root: truncating a .so this process has mapped would crash
    # it, whereas a real corrupt cache comes from another process (a crash mid-link, a full disk).
    # The session's cache is shared by the xdist workers: copy under its build lock, so no worker
    # is rebuilding it meanwhile.
    with build._file_lock(build.cache_root() / f"{built_dir.name}.lock"):
        listing = sorted(p.name for p in built_dir.iterdir()) if built_dir.is_dir() else "missing"
        assert build.cached_library("aio") is not None, f"{built_dir}: {listing}"
        shutil.copytree(built_dir, tmp_path / "cache" / built_dir.name)
    monkeypatch.setenv("DS_OPS_CACHE", str(tmp_path / "cache"))
    build.reset()
    so = build.cached_library("aio")
    assert so is not None and build.describe("aio").startswith("built")
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 3])
    assert build.cached_library("aio") is None
    assert build.describe("aio").startswith("buildable")
    module = build.load("aio")
    rebuilt = build.cached_library("aio")
    assert module is not None and rebuilt is not None
    # CPython keeps one module object per extension name in a process: when another test in this
    # worker imported the op first, load() hands back that object, so compare the files, not __file__
    assert rebuilt.stat().st_size > len(data) // 3


def test_manifest_names_the_library_this_build_wrote(tmp_path):
    """When the interpreter hands back a module it imported from another cache dir, or torch
    versioned the file name, the manifest still names the file in the build dir."""
    import types

    elsewhere = tmp_path / "other" / "ds_ops_aio_k.so"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    build_dir = tmp_path / "aio-k"
    build_dir.mkdir()
    (build_dir / "ds_ops_aio_k.so").write_bytes(b"old")
    (build_dir / "ds_ops_aio_k_v1.so").write_bytes(b"new")
    os.utime(build_dir / "ds_ops_aio_k.so", (1_000, 1_000))
    os.utime(build_dir / "ds_ops_aio_k_v1.so", (2_000, 2_000))
    module = types.ModuleType("ds_ops_aio_k")
    module.__file__ = str(elsewhere)
    assert build._built_library(module, "ds_ops_aio_k", build_dir) == build_dir / "ds_ops_aio_k_v1.so"
    module.__file__ = str(build_dir / "ds_ops_aio_k.so")
    assert build._built_library(module, "ds_ops_aio_k", build_dir) == build_dir / "ds_ops_aio_k.so"
    module.__file__ = str(elsewhere)
    with pytest.raises(build.BuildError, match="left no library"):
        build._built_library(module, "ds_ops_woq_k", build_dir)


def test_file_lock_serialises(tmp_path):
    lock = tmp_path / "x.lock"
    order = []

    def other():
        with build._file_lock(lock):
            order.append("other")

    with build._file_lock(lock):
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join()
    assert order == ["first", "other"]


def test_ds_ops_build_cli(capsys):
    from ds_ops.cli import main

    assert main(["build", "aio"]) == 0
    assert "aio" in capsys.readouterr().out
    assert main(["build", "nope"]) == 2
    assert "unknown extension(s) nope" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "adam_step" in capsys.readouterr().out
