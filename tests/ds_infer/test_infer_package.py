"""ds-infer installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_infer", None)
    plugins.clear_cache()
    spec = plugins.features()["infer"]
    assert spec.config_section is None  # inference settings are init_inference's, not a training section
    assert spec.dist == "ds-infer"
    assert "weight_only_quantization" in spec.capabilities
    assert "ds_infer" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_infer

    assert isinstance(ds_infer.__all__, list)
    assert ds_infer.__version__
    for name in ds_infer.__all__:
        assert getattr(ds_infer, name) is not None
