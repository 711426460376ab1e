"""ds-infer installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_infer", None)
    plugins.clear_cache()
    spec = plugins.features()["infer"]
    assert spec.config_section == "tensor_parallel"
    assert spec.dist == "ds-infer"
    assert "ds_infer" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_infer

    assert isinstance(ds_infer.__all__, list)
    assert ds_infer.__version__
