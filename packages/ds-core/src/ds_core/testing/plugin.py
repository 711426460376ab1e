"""pytest plugin (entry point ``pytest11``): run a test body on N ranks.

    @pytest.mark.world_size(2)                 # 2 real processes over gloo
    def test_all_reduce(): ...

    @pytest.mark.world_size(4, mode="thread", timeout=30)
    def test_logic(): ...

    @pytest.mark.cuda                          # needs a CUDA device; skipped elsewhere, with the reason
    def test_triton_kernel_compiles(): ...

    @pytest.mark.smoke                         # one of the few `nox -s isolated` runs per package
    @pytest.mark.serial                        # never beside another serial test under pytest-xdist

The test function runs on every rank; fixtures it requests are resolved once in the pytest process
and passed to every rank (so they must pickle: ``tmp_path`` does). The ``distributed`` fixture runs
any module-level function on N ranks and returns the per-rank results.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "world_size(n, mode='process', timeout=None, backend='gloo'): run the test body on n ranks",
    )
    config.addinivalue_line(
        "markers",
        "cuda: needs a CUDA device (run them with `pytest -m cuda` or `nox -s gpu`); skipped elsewhere",
    )
    config.addinivalue_line(
        "markers",
        "smoke: the few tests that prove a package works when installed alone (run by `nox -s isolated`)",
    )
    config.addinivalue_line(
        "markers",
        "serial: not safe to run beside another such test (a fixed port, a shared path): with pytest-xdist "
        "(--dist loadgroup) these all run in one worker, one after another",
    )
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist's grouping (also without xdist)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("serial") is not None:
            item.add_marker(pytest.mark.xdist_group("serial"))
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: none is visible here (torch.cuda.is_available() "
                                   "is False); run `nox -s gpu` on a GPU machine")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("world_size")
    if marker is None:
        return None
    from .harness import DEFAULT_TIMEOUT, run_distributed

    world_size = marker.args[0] if marker.args else marker.kwargs.get("n", 2)
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    run_distributed(
        pyfuncitem.obj,
        world_size,
        kwargs=kwargs,
        timeout=marker.kwargs.get("timeout") or DEFAULT_TIMEOUT,
        backend=marker.kwargs.get("backend", "gloo"),
        mode=marker.kwargs.get("mode", "process"),
    )
    return True


class _Runner:
    def run(self, fn, world_size=2, **options):
        from .harness import run_distributed

        return run_distributed(fn, world_size, **options)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 4 MiB tmpfs mounted for this test (a file system that can really fill up); the test is
    skipped, with the reason, where mounting is not allowed (not root, no ``mount``)."""
    from .faults import Unavailable, mounted_tmpfs

    mounted = mounted_tmpfs("4m", tmp_path)
    try:
        path = mounted.__enter__()
    except Unavailable as exc:
        pytest.skip(f"needs a real tmpfs: {exc}")
    try:
        yield path
    finally:
        mounted.__exit__(None, None, None)


@pytest.fixture
def distributed():
    """``distributed.run(fn, world_size, args=..., kwargs=..., mode=..., timeout=...)``."""
    return _Runner()
