"""ds-zero installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_zero", None)
    plugins.clear_cache()
    spec = plugins.features()["zero"]
    assert spec.config_section == "zero_optimization"
    assert spec.dist == "ds-zero"
    assert "ds_zero" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_zero

    assert isinstance(ds_zero.__all__, list)
    assert ds_zero.__version__
