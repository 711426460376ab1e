"""ds-pipe installs alone with ds-core and is discovered as a feature without being imported."""

import sys

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_feature_is_described_without_import():
    sys.modules.pop("ds_pipe", None)
    plugins.clear_cache()
    spec = plugins.features()["pipe"]
    assert spec.config_section == "pipeline"
    assert spec.dist == "ds-pipe"
    assert "ds_pipe" not in sys.modules


@pytest.mark.smoke
def test_public_surface():
    import ds_pipe

    assert isinstance(ds_pipe.__all__, list)
    assert ds_pipe.__version__
