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
    assert spec.component("model_wrapper").order == 10  # before other model transforms
    assert model.model_validate({"autotp_size": 2}).ds_axes() == {"tensor": 2}
    assert model.model_validate({"autotp_size": 1}).ds_axes() == {}


def test_config_asks_initialize_for_its_axes():
    """``tensor_parallel.autotp_size`` and ``sequence_parallel_size`` lay the run out before any process
    group exists (the topology is only described here); a topology without them is refused."""
    from torch import nn

    from ds_core.comm import Topology
    from ds_core.config import parse_config
    from ds_core.engine.components import select_components
    from ds_core.engine.initialize import resolve_topology
    from ds_core.errors import ConfigError

    cfg = parse_config({"train_micro_batch_size_per_gpu": 1, "tensor_parallel": {"autotp_size": 2},
                        "sequence_parallel_size": 2})
    topology = resolve_topology(nn.Linear(2, 2), None, 8, cfg)
    assert (topology.size("tensor"), topology.size("sequence"), topology.size("data")) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"config section 'tensor_parallel' needs tensor=2 but the run's "
                                          r"topology has tensor=1"):
        resolve_topology(nn.Linear(2, 2), Topology(8, sequence=2), 8, cfg)
    # sequence_parallel_size alone selects ds-parallel's model wrapper (it splits the sequences)
    alone = parse_config({"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": 2})
    assert [name for name, *_ in select_components(alone)["model_wrapper"]] == ["parallel"]
