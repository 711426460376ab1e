"""Framework integrations: ds driven by Lightning and by the Hugging Face Trainer.

- :mod:`ds_core.integrations.lightning`: ``DSStrategy``, registered in Lightning's ``StrategyRegistry``
  as ``ds``, ``ds_stage_1``, ``ds_stage_2``, ``ds_stage_3`` and ``ds_stage_3_offload`` on import
  (extra ``ds-core[lightning]``);
- :mod:`ds_core.integrations.transformers`: a ``Trainer`` whose model, optimizer, backward, step and
  checkpoints go through the ds engine (extra ``ds-core[transformers]``).

Each submodule imports its framework; this package imports nothing, so ds-core keeps its narrow
dependencies.
"""

__all__ = ["lightning", "transformers"]
