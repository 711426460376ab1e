"""The key pass over a raw config, before any model validates it.

Every key is judged by the table in :mod:`ds_core.config.keys`:

- keys starting with ``_`` are comments, at any depth, and are dropped;
- another spelling (``bfloat16``, ``aio.intra_op_parallelism``) is read as its key;
- a ``handled`` key goes on to the model that gives it its effect (ds-core's, or the feature
  package's for its section); a key of a package that is not installed is an error naming it;
- a ``no_effect`` key is dropped, with one warning naming it when its value asks for something ds
  does not do; a ``refused`` key whose value asks for its feature is an error naming the feature and
  the fix;
- a key the table does not know and the owning model does not either is a typo when it is one or two
  edits from a valid key at its level (an error with the fix), is refused in a section where
  DeepSpeed refuses unknown keys (``strict``), and is otherwise dropped with one warning naming it —
  DeepSpeed ignores it too.

``"auto"`` inside a section DeepSpeed validates with its own models (``strict``) means that key's
default, as in DeepSpeed; it is dropped here so every model sees only real values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .. import plugins
from ..errors import ConfigError, closest
from .keys import KeyEntry, children, near_miss, triggers

__all__ = ["Screened", "screen", "without_comments"]

# Keys ds handles in the key pass itself (no model field): see _handle_here.
_HANDLED_HERE = ("vocabulary_size", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer")


@dataclass
class Screened:
    """A config after the key pass: what each model validates, and the warnings to give."""

    core: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    given: dict[str, Any] = field(default_factory=dict)  # the config without comments, aliases resolved


def without_comments(value: Any) -> Any:
    """``value`` with every key starting with ``_`` removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_comments(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, list):
        return [without_comments(v) for v in value]
    return value


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_fields(model: type[BaseModel] | None) -> dict[str, Any]:
    """Field info by every name a key may use (field name and alias)."""
    if model is None:
        return {}
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        out[name] = info
        if info.alias:
            out[info.alias] = info
    return out


def _submodel(info: Any) -> type[BaseModel] | None:
    """The Section model a field holds (``X`` or ``X | None``), if any."""
    if info is None:
        return None
    annotation = info.annotation
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


class _Pass:
    def __init__(self, where: str) -> None:
        self.where = where
        self.notes: list[str] = []

    # -- messages --------------------------------------------------------------------------------
    def note_no_effect(self, e: KeyEntry, value: Any) -> None:
        if e.when in ("enabled", "present", "changed_keys"):
            shown = "is enabled" if e.when == "enabled" else "is set"
        else:
            shown = f"= {_show(value)}"
        self.notes.append(f"{self.where}: DeepSpeed key {e.path!r} is accepted but has no effect in ds "
                          f"({e.path} {shown}): {e.why}; remove it to silence this warning")

    def refuse(self, e: KeyEntry, value: Any) -> None:
        shown = "enabled" if e.when == "enabled" else _show(value)
        raise ConfigError(f"{self.where}: {e.path} ({shown}) asks for {e.feature}: {e.fix}")

    def unknown(self, prefix: str, key: str, valid: set[str], strict: bool, section: str) -> None:
        """A key neither the table nor the owning model knows: typo, refused, or ignored."""
        path = f"{prefix}{key!r}"
        near = near_miss(key, valid)
        if near is not None:
            ignored = "" if strict else " — DeepSpeed would silently ignore the misspelled key"
            raise ConfigError(f"{self.where}: unknown config key {path} (did you mean {near!r}?); fix the "
                              f"spelling{ignored}")
        home = _home_of(key, section)
        if strict:
            hint = "" if home else closest(key, valid)
            listing = "" if hint or home else f"; the keys of {section!r} are: {', '.join(sorted(valid))}"
            raise ConfigError(f"{self.where}: unknown config key {path}{hint}: it is not a key of {section!r}{home} "
                              f"and DeepSpeed rejects it too; remove it{listing}")
        self.notes.append(f"{self.where}: unknown key {prefix}{key} is ignored: it is not a DeepSpeed or ds "
                          f"config key{home} (DeepSpeed ignores it too); remove it to silence this warning")

    # -- the walk --------------------------------------------------------------------------------
    def mapping(self, value: dict[str, Any], path: str, model: type[BaseModel] | None,
                strict: bool) -> dict[str, Any]:
        """Screen the keys of a section at ``path`` (validated by ``model`` when there is one)."""
        table = children(path)
        fields = _model_fields(model)
        valid = {k for k, e in table.items()} | set(fields)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("_"):
                continue
            e = table.get(key)
            if e is not None and e.status == "alias":
                target = e.alias_of or key
                if target in value:
                    raise ConfigError(f"{self.where}: both {path}.{key} and {path}.{target} are set; they are the "
                                      f"same key: keep one")
                key, e = target, table.get(target)
            if strict and _is_auto(item):
                continue  # DeepSpeed's models read "auto" as the default
            info = fields.get(key)
            if e is None:
                if info is None:
                    self.unknown(f"{path}.", key, valid, strict, path)
                    continue
                out[key] = self.nested(item, f"{path}.{key}", _submodel(info), None)
                continue
            if e.only_when and not self.applies(e, value, path):
                continue
            kept = self.judge(e, item, _submodel(info))
            if kept is not _DROP:
                out[key] = kept
        return out

    def applies(self, e: KeyEntry, siblings: dict[str, Any], path: str) -> bool:
        """False (and one warning if the value asks for anything) when ``e`` only acts with sibling
        values its section does not have, e.g. offload_param below stage 3 — DeepSpeed ignores it too."""
        table = children(path)
        unmet = []
        for key, allowed in e.only_when.items():
            current = siblings.get(key, table[key].default if key in table else None)
            if not any(current == v and type(current) is type(v) for v in allowed):
                unmet.append(f"{key} {' or '.join(map(repr, allowed))}")
        if not unmet:
            return True
        if _asks(siblings.get(e.name)):
            self.notes.append(f"{self.where}: DeepSpeed key {e.path!r} is accepted but has no effect here: it acts "
                              f"only with {path}.{' and '.join(unmet)} (DeepSpeed ignores it too); {e.why}")
        return False

    def nested(self, item: Any, path: str, model: type[BaseModel] | None, e: KeyEntry | None) -> Any:
        if isinstance(item, dict) and (model is not None or (e is not None and e.container)):
            strict = e.strict if e is not None else True
            return self.mapping(item, path, model, strict)
        return item

    def judge(self, e: KeyEntry, item: Any, model: type[BaseModel] | None) -> Any:
        """What happens to a known key: its value for the model, or _DROP."""
        if e.status in ("handled", "section", "package"):
            if e.needs and triggers(e, item) and not _installed(e.needs):
                raise ConfigError(f"{self.where}: {e.path} = {_show(item)} needs the {e.needs} package, which is "
                                  f"not installed; run `pip install {e.needs}` or remove the key")
            return self.nested(item, e.path, model, e)
        if e.status == "no_effect":
            self.collapsed_keys(e, item)
            if triggers(e, item):
                self.note_no_effect(e, item)
            return _DROP
        if e.status == "refused":
            self.collapsed_keys(e, item)
            if triggers(e, item):
                self.refuse(e, item)
            return _DROP
        raise AssertionError(f"unhandled status {e.status}")

    def collapsed_keys(self, e: KeyEntry, item: Any) -> None:
        """Typos inside a section ds accepts or refuses as a whole (its documented keys are listed)."""
        names = set(e.keys) | set(e.defaults)
        if not isinstance(item, dict) or not names:
            return
        for key in item:
            if isinstance(key, str) and not key.startswith("_") and key not in names:
                self.unknown(f"{e.path}.", key, names, e.strict, e.path)


_DROP = object()


def _asks(value: Any) -> bool:
    """Whether a section's value asks for anything (an offload device other than none, enabled: true, ...)."""
    if isinstance(value, dict):
        if "device" in value:
            return str(value["device"]).strip().lower() not in ("none", "null")
        if "enabled" in value:
            return value["enabled"] is True
        return bool(value)
    return value not in (None, False)


def _installed(dist: str) -> bool:
    return any(spec.dist == dist for spec in plugins.features().values())


def _installed_without(dist: str, section: str) -> bool:
    """True when ``dist`` is installed but none of its features reads ``section``."""
    specs = [spec for spec in plugins.features().values() if spec.dist == dist]
    return bool(specs) and all(spec.config_section != section for spec in specs)


def _home_of(key: str, section: str) -> str:
    """' (it is a key of fp16)' when ``key`` belongs to another top-level section."""
    homes = sorted(p for p, e in children("").items()
                   if p != section and (key in children(p) or key in e.keys or key in e.defaults))
    return f" (it is a key of {' / '.join(homes)})" if homes else ""


def screen(raw: dict[str, Any], where: str, core_model: type[BaseModel]) -> Screened:
    """The key pass over a whole config; ``core_model`` is ds-core's top-level model (DSConfig)."""
    run = _Pass(where)
    result = Screened()
    core_fields = _model_fields(core_model)
    top = children("")
    valid_top = set(top) | set(core_fields)
    for key, value in raw.items():
        if not isinstance(key, str) or key.startswith("_"):
            continue
        e = top.get(key)
        if e is not None and e.status == "alias":
            target = e.alias_of or key
            if target in raw:
                raise ConfigError(f"{where}: both {key!r} and {target!r} are set; {key!r} is another name of "
                                  f"{target!r}: keep one")
            key, e = target, top.get(target)
        if key == "zero_optimization" and isinstance(value, bool):
            value = {"stage": 1 if value else 0}  # DeepSpeed's oldest spelling
        result.given[key] = without_comments(value)
        spec = plugins.feature_for_section(key)
        if spec is not None:
            model = spec.load_config_model()
            if model is None or not isinstance(value, dict):  # the package reads its section as given
                result.features[key] = without_comments(value)
            else:
                result.features[key] = run.mapping(value, key, model, e.strict if e is not None else True)
            continue
        if e is None:
            if key in core_fields:  # a ds-core field the table does not list (kept in sync by a test)
                result.core[key] = run.nested(value, key, _submodel(core_fields[key]), None)
            else:
                run.unknown("", key, valid_top, False, "")
            continue
        if e.status == "package":
            if e.by and _installed_without(e.by, key):
                raise ConfigError(f"{where}: section {key!r} belongs to {e.by}, which is installed but does not read "
                                  f"it from a training config; remove the section (see the {e.by} docs for its API)")
            raise ConfigError(f"{where}: section {key!r} needs the {e.by} package, which is not installed; run "
                              f"`pip install {e.by}` or remove the section")
        if key in _HANDLED_HERE:
            _handle_here(run, key, value)
            continue
        kept = run.judge(e, value, _submodel(core_fields.get(key)))
        if kept is not _DROP and key in core_fields:
            result.core[key] = kept
    result.notes = run.notes
    return result


def _handle_here(run: _Pass, key: str, value: Any) -> None:
    if key == "vocabulary_size":
        # DeepSpeed's only use of it: a warning when tensor cores cannot tile the embedding evenly.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{run.where}: vocabulary_size {value!r} must be a whole number >= 1 (the "
                              f"embedding's row count), or be removed")
        if value % 8:
            run.notes.append(f"{run.where}: vocabulary_size {value} is not a multiple of 8, which may lower "
                             f"tensor-core utilization; pad the vocabulary to {value + (-value) % 8}")
        return
    # zero_allow_untested_optimizer / zero_force_ds_cpu_optimizer: safety switches DeepSpeed needs and ds
    # does not: ds runs ZeRO with any optimizer and offloads without DeepSpeed's CPU Adam.
    if not isinstance(value, bool):
        raise ConfigError(f"{run.where}: {key} {value!r} must be true or false")

