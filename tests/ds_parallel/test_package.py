"""ds-parallel installs alone with ds-core: it imports, its feature descriptor and components resolve."""

import pytest

from ds_core import plugins


@pytest.mark.smoke
def test_imports_and_public_names():
    import ds_parallel

    for name in ds_parallel.__all__:
        assert getattr(ds_parallel, name) is not None, name


@pytest.mark.smoke
def test_feature_descriptor_resolves():
    plugins.clear_cache()
    spec = plugins.feature_for_section("tensor_parallel")
    assert spec is not None and spec.name == "parallel", "ds-parallel owns the tensor_parallel section"
    assert spec.component("model_wrapper").__name__ == "model_wrapper"
    model = spec.load_config_model()
    assert model.model_validate({"autotp_size": 2}).size == 2
