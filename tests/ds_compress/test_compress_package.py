"""ds-compress installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_compress", None)
    plugins.clear_cache()
    spec = plugins.features()["compress"]
    assert spec.config_section == "compression_training"
    assert spec.dist == "ds-compress"
    assert "ds_compress" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_compress

    assert isinstance(ds_compress.__all__, list)
    assert ds_compress.__version__
