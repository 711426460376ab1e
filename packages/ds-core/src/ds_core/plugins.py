"""The plugin registry: one view over the ``ds.*`` entry-point groups.

Plugins are registered by qualified name and imported only when used. Features describe themselves
as data: the ``ds.features`` entry point names the feature's import package, and that package ships a
``ds_feature.json`` beside its ``__init__.py``. We locate the file with ``importlib.util.find_spec``,
which does not run the package, so ``ds report`` and the config loader can list every feature without
importing any feature code. A plugin that fails to load is reported by name and skipped.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import PluginError

__all__ = [
    "GROUPS",
    "PluginRef",
    "FeatureSpec",
    "entries",
    "features",
    "feature_for_section",
    "failures",
    "load_qualified",
]

GROUPS = ("ds.accelerators", "ds.features", "ds.ops", "ds.cli")
FEATURE_FILE = "ds_feature.json"

_failures: list[tuple[str, str, str]] = []


def load_qualified(name: str) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute."""
    module_name, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class PluginRef:
    """One entry point: its group, name, qualified value and the distribution that declared it."""

    group: str
    name: str
    value: str
    dist: str | None = None

    def load(self) -> Any:
        try:
            return load_qualified(self.value)
        except Exception as exc:  # a broken plugin must not take the process down
            raise PluginError(
                f"plugin {self.name!r} ({self.value}, from {self.dist or 'unknown distribution'}) "
                f"in group {self.group} failed to load: {type(exc).__name__}: {exc}; "
                f"reinstall or uninstall {self.dist or 'it'}"
            ) from exc


@cache
def entries(group: str) -> tuple[PluginRef, ...]:
    """Every entry point of ``group`` (sorted by name; duplicates from one distribution dropped)."""
    if group not in GROUPS:
        raise PluginError(f"unknown plugin group {group!r}; the groups are {', '.join(GROUPS)}")
    seen: dict[str, PluginRef] = {}
    for ep in metadata.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else None
        seen.setdefault(ep.name, PluginRef(group, ep.name, ep.value, dist))
    return tuple(sorted(seen.values(), key=lambda ref: ref.name))


def report_failure(ref: PluginRef | None, group: str, name: str, error: BaseException) -> None:
    """Remember and warn about a plugin that could not be used (once); callers then skip it."""
    entry = (group, name, str(error))
    if entry in _failures:
        return
    _failures.append(entry)
    warnings.warn(str(error), RuntimeWarning, stacklevel=3)


def failures() -> list[tuple[str, str, str]]:
    """(group, name, reason) for each plugin that failed to load in this process."""
    return list(_failures)


@dataclass(frozen=True)
class FeatureSpec:
    """A feature described as data (read from its ``ds_feature.json``).

    ``components`` maps a component kind the engine asks for (``optimizer_wrapper``,
    ``gradient_reducer``, ``model_wrapper``, ``checkpoint_layout``, ...) to the qualified name of a
    factory; nothing is imported until :meth:`component` is called. ``model_classes`` lets a feature
    claim a model by type (a pipeline module selects the pipeline engine without a config section).
    """

    name: str
    module: str
    dist: str | None
    config_section: str | None = None
    description: str = ""
    config_model: str | None = None
    capabilities: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    components: dict[str, str] = field(default_factory=dict)
    model_classes: tuple[str, ...] = ()
    version: str | None = None

    def claims_model(self, model: Any) -> bool:
        """True if ``model`` is an instance of one of ``model_classes`` ("module:Qualname").

        Compared by name over the model's class hierarchy, so nothing is imported to answer.
        """
        names = {f"{c.__module__}:{c.__qualname__}" for c in type(model).__mro__}
        return any(name in names for name in self.model_classes)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], module: str, dist: str | None) -> FeatureSpec:
        known = {"name", "config_section", "description", "config_model", "capabilities",
                 "devices", "precisions", "components", "model_classes"}
        extra = set(data) - known
        if extra or "name" not in data:
            raise PluginError(
                f"{module}/{FEATURE_FILE}: keys {sorted(extra)} are not part of a feature "
                f"description (allowed: {sorted(known)}; 'name' is required)"
            )
        version = None
        if dist:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return cls(
            name=data["name"],
            module=module,
            dist=dist,
            config_section=data.get("config_section"),
            description=data.get("description", ""),
            config_model=data.get("config_model"),
            capabilities=tuple(data.get("capabilities", ())),
            devices=tuple(data.get("devices", ())),
            precisions=tuple(data.get("precisions", ())),
            components=dict(data.get("components", {})),
            model_classes=tuple(data.get("model_classes", ())),
            version=version,
        )

    def component(self, kind: str) -> Any | None:
        """The factory registered for ``kind``, imported now; ``None`` if the feature has none."""
        target = self.components.get(kind)
        if target is None:
            return None
        return PluginRef("ds.features", f"{self.name}.{kind}", target, self.dist).load()

    def load_config_model(self) -> Any | None:
        if self.config_model is None:
            return None
        return PluginRef("ds.features", f"{self.name}.config", self.config_model, self.dist).load()


def _describe(ref: PluginRef) -> FeatureSpec:
    spec = importlib.util.find_spec(ref.value)
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(
            f"feature {ref.name!r} from {ref.dist}: entry point value {ref.value!r} must name an "
            f"installed import package that ships {FEATURE_FILE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / FEATURE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PluginError(f"feature {ref.name!r}: cannot read {path}: {exc}") from exc
    return FeatureSpec.from_mapping(data, ref.value, ref.dist)


@cache
def features() -> dict[str, FeatureSpec]:
    """Installed features by name, described without importing their code."""
    found: dict[str, FeatureSpec] = {}
    for ref in entries("ds.features"):
        try:
            found[ref.name] = _describe(ref)
        except PluginError as exc:
            report_failure(ref, ref.group, ref.name, exc)
    return found


def feature_for_section(section: str) -> FeatureSpec | None:
    """The installed feature that owns a config section, if any."""
    for spec in features().values():
        if spec.config_section == section:
            return spec
    return None


def clear_cache() -> None:
    """Forget discovered plugins (tests that install plugins at run time call this)."""
    entries.cache_clear()
    features.cache_clear()
    _failures.clear()
