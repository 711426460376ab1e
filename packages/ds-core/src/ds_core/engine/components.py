"""The feature seam: engine components contributed by feature packages, chosen by config section.

A feature's ``ds_feature.json`` maps component kinds to factories. When the feature's config section
is present in the config, the engine calls the factory instead of its default:

- ``engine_class``: ``factory() -> type`` — a different engine for a different training contract
  (a pipeline engine with ``train_batch``); called as ``cls(**initialize_kwargs)``.
- ``model_wrapper``: ``factory(engine, module) -> module`` — wrap or transform the model.
- ``gradient_reducer``: ``factory(engine) -> reducer`` with ``begin(sync)``, ``finish()``,
  ``attach_grads()`` and ``remove()`` (see :class:`~ds_core.engine.reducer.DataParallelReducer`).
- ``optimizer_wrapper``: ``factory(engine, build_optimizer) -> wrapper`` with ``step() -> bool``,
  ``zero_grad()``, ``state_dict()``, ``load_state_dict()``, ``param_groups``, ``global_grad_norm``
  and ``loss_scale`` (see :class:`~ds_core.engine.mixed.MixedPrecisionOptimizer`).
- ``checkpoint_layout``: ``factory(engine) -> layout`` with ``save(engine, save_dir, tag, client_state)``
  and ``load(engine, load_dir, tag, load_optimizer_states, load_lr_scheduler_states)``.

A factory may return ``None`` to keep the engine's default (e.g. ZeRO at stage 0). Two features
may not provide the same kind; that is a config error naming both.
"""

from __future__ import annotations

from typing import Any

from .. import plugins
from ..errors import ConfigError

__all__ = ["KINDS", "select_components"]

KINDS = ("engine_class", "model_wrapper", "gradient_reducer", "optimizer_wrapper", "checkpoint_layout")


def select_components(config, model=None) -> dict[str, tuple[str, Any]]:
    """kind -> (feature name, factory) for the features whose sections the config uses, or that
    claim the model's class (``model_classes`` in the feature description)."""
    chosen: dict[str, tuple[str, Any]] = {}
    active = [plugins.feature_for_section(section) for section in config.features]
    if model is not None:
        active += [spec for spec in plugins.features().values() if spec.claims_model(model)]
    seen: set[str] = set()
    for spec in active:
        if spec is None or spec.name in seen:
            continue
        seen.add(spec.name)
        for kind in spec.components:
            if kind not in KINDS:
                raise ConfigError(f"feature {spec.name!r} ({spec.dist}) declares component {kind!r}; "
                                  f"known kinds are {', '.join(KINDS)}")
            if kind in chosen:
                raise ConfigError(
                    f"features {chosen[kind][0]!r} and {spec.name!r} both provide {kind!r}; remove "
                    f"the config section of one of them")
            chosen[kind] = (spec.name, spec.component(kind))
    return chosen
