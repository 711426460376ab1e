"""Compression training (ds-compress) composed with ZeRO stages 1 and 2 (ds-zero) on 2 gloo ranks:
the engine's run equals the single-process PyTorch reference on the global batch."""

import pytest

from tests.ds_compress import _engine_run


@pytest.mark.parametrize("stage", [1, 2])
def test_compression_training_with_zero(distributed, stage):
    _engine_run.check(distributed.run(_engine_run.engine_run, 2, args=(stage,)))


def test_zero_stage_3_is_refused():
    import ds_core
    from ds_compress import CompressionError

    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 3}, "compression_training": _engine_run.SECTION}
    with pytest.raises(CompressionError, match="ZeRO stages 0-2"):
        ds_core.initialize(model=_engine_run._model(), config=config)
