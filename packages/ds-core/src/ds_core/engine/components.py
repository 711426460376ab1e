"""The feature seam: what a feature package contributes to the engine, chosen by config section.

A feature's ``ds_feature.json`` maps component kinds to factories (qualified names, imported only when
used). When the feature's config section is present — or it claims the model's class — the engine uses
them:

- ``engine_class``: ``factory() -> type`` — a driver with its own training contract (the pipeline's
  ``train_batch``), called as ``cls.initialize(**initialize_kwargs)``; it builds and drives an
  :class:`~ds_core.engine.Engine` itself. At most one.
- ``model_wrapper``: ``factory(context, module) -> module`` — a model transform (tensor-parallel plan,
  compression wrappers), given a :class:`~ds_core.engine.context.ModelContext`. Several features may
  provide one; they run in ascending ``factory.order`` (default 100; ties by feature name), before the
  data-parallel strategy takes the parameters, e.g. tensor parallelism (order 10) before compression.
- ``data_parallel_strategy``: ``factory(section) -> strategy | None`` — a
  :class:`~ds_core.engine.strategy.DataParallelStrategy` (ZeRO; 1-bit Adam; ZeRO++), given the
  feature's parsed config section; ``None`` keeps stage 0. At most one.

Two features providing the same single kind is a config error naming both.
"""

from __future__ import annotations

from typing import Any

from .. import plugins
from ..errors import ConfigError

__all__ = ["KINDS", "SINGLE", "RETIRED", "select_components", "model_transforms"]

KINDS = ("engine_class", "model_wrapper", "data_parallel_strategy")
SINGLE = ("engine_class", "data_parallel_strategy")
#: kinds of the earlier seam and what replaced them
RETIRED = {
    "gradient_reducer": "data_parallel_strategy",
    "optimizer_wrapper": "data_parallel_strategy",
    "checkpoint_layout": "data_parallel_strategy (its save/load)",
}


def select_components(config, model=None) -> dict[str, Any]:
    """kind -> ``(feature name, factory, config section name)`` for single kinds, and ``model_wrapper``
    -> a list of them, for the features whose sections the config uses or that claim the model."""
    chosen: dict[str, Any] = {}
    active = [plugins.feature_for_section(section) for section in config.features]
    active += _needed_by_keys(config)
    if model is not None:
        active += [spec for spec in plugins.features().values() if spec.claims_model(model)]
    seen: set[str] = set()
    for spec in active:
        if spec is None or spec.name in seen:
            continue
        seen.add(spec.name)
        for kind in spec.components:
            if kind in RETIRED:
                raise ConfigError(f"feature {spec.name!r} ({spec.dist}) declares component {kind!r}, which the "
                                  f"engine no longer has: provide a {RETIRED[kind]} instead (docs/engine.md)")
            if kind not in KINDS:
                raise ConfigError(f"feature {spec.name!r} ({spec.dist}) declares component {kind!r}; "
                                  f"known kinds are {', '.join(KINDS)}")
            entry = (spec.name, spec.component(kind), spec.config_section)
            if kind == "model_wrapper":
                chosen.setdefault(kind, []).append(entry)
                continue
            if kind in chosen:
                raise ConfigError(
                    f"features {chosen[kind][0]!r} and {spec.name!r} both provide {kind!r}; remove "
                    f"the config section of one of them")
            chosen[kind] = entry
    return chosen


def _needed_by_keys(config) -> list:
    """Features of the packages that top-level keys set to a value that does something say they need
    (the key table's ``needs``: ``sequence_parallel_size`` > 1 needs ds-parallel, whose model wrapper
    then splits the sequences), so such a key works without its package's config section."""
    from ..config.keys import key_table

    out = []
    for path, entry in key_table().entries.items():
        if "." in path or not entry.needs:
            continue
        value = getattr(config, entry.name, None)
        if value is None or (entry.inert is not None and value in entry.inert):
            continue
        out += [spec for spec in plugins.features().values() if spec.dist == entry.needs]
    return out


def model_transforms(components: dict) -> list[tuple[str, Any, str | None]]:
    """The ``model_wrapper`` entries in the order they run (``factory.order``, then feature name)."""
    entries = components.get("model_wrapper", [])
    return sorted(entries, key=lambda e: (getattr(e[1], "order", 100), e[0]))
