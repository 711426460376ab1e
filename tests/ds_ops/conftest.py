"""Every ds_ops test session builds into its own kernel cache (DS_OPS_CACHE), never ~/.cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def ds_ops_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("ds_ops_cache")
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
