"""Every ds_ops test session builds into its own kernel cache (DS_OPS_CACHE), never ~/.cache;
Triton kernels are tested under the interpreter."""

from __future__ import annotations

import importlib
import os

import pytest

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def ds_ops_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        base = tmp_path_factory.getbasetemp()  # under pytest-xdist: one cache for the run's workers
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ds_ops_cache"
        root.mkdir(exist_ok=True)  # builds in it are file-locked: the first worker builds, the rest load
        mp.setenv("DS_OPS_CACHE", str(root))
        mp.delenv("DS_OPS_JIT", raising=False)
        from ds_ops import build, registry

        build.reset()
        registry.register()
        yield root
        build.reset()


@pytest.fixture
def fresh_build():
    """Forget loaded/failed extensions before and after a test that changes the build environment."""
    from ds_ops import build

    build.reset()
    yield build
    build.reset()


@pytest.fixture
def triton_kernels():
    """``triton_kernels("quant")`` imports ``ds_ops.triton.quant``, or skips saying why it cannot run."""
    import ds_ops.triton

    def load(name: str):
        if not ds_ops.triton.available():
            pytest.skip(f"Triton kernels not tested: {ds_ops.triton.unavailable_reason()}")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels run on CPU only with TRITON_INTERPRET=1 (set before triton is imported)")
        return importlib.import_module(f"ds_ops.triton.{name}")

    return load
