"""ds-moe installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_moe", None)
    plugins.clear_cache()
    spec = plugins.features()["moe"]
    assert spec.config_section == "moe"
    assert spec.dist == "ds-moe"
    assert "ds_moe" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_moe

    assert isinstance(ds_moe.__all__, list)
    assert ds_moe.__version__
