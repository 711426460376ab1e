"""ds-ops installs alone with ds-core and its provider is found through the ds.ops group."""

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_provider_registered():
    plugins.clear_cache()
    names = [ref.name for ref in plugins.entries("ds.ops")]
    assert "ds_ops" in names
