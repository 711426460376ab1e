"""compression_training through the ds-core engine on 2 gloo ranks equals a single-process PyTorch
loop on the global batch (the schedule advancing with engine.global_steps). ZeRO stages 1 and 2 are
in tests/integration/test_compress_zero.py (they need ds-zero installed)."""

import pytest

from ds_core import plugins

from . import _engine_run


@pytest.mark.smoke
def test_feature_registered_with_the_engine_component():
    spec = plugins.features()["compress"]
    assert spec.config_section == "compression_training"
    assert spec.load_config_model().__name__ == "CompressionTrainingConfig"
    assert callable(spec.component("model_wrapper"))


@pytest.mark.smoke
def test_two_ranks_match_the_single_process_reference(distributed):
    _engine_run.check(distributed.run(_engine_run.engine_run, 2, args=(None,)))

