"""What goes into an engine checkpoint, and who writes each part.

A checkpoint directory (written with the atomic protocol of ``checkpoint.py``) is assembled from three
parts, so that any module layout composes with any data-parallel strategy:

- the **module** files: the module's state dict in ``model.safetensors`` (written once per scope by its
  first data rank), parameters tagged as differing across a data sub-axis (experts) in
  ``model_rank{r}.safetensors`` under their module names — or, for the pipeline, one file per layer
  (``ds_pipe.checkpoint.LayerFiles``, the same interface);
- the **strategy**'s state (master weights, optimizer state, partitions), which the strategy adds to a
  :class:`StateWriter` and reads back from a :class:`StateReader` (``DataParallelStrategy.save/load``);
- the **engine**'s JSON (config, counters, scheduler, loss scaler, client state: ``meta.json``) and every
  rank's RNG state (``rng_rank{r}.*``).

A *scope* is the set of ranks holding the same shard of the model — one pipeline stage, one
tensor-parallel rank (``Topology.scope``): its files are prefixed with it (``pp1_model...``) and its JSON
goes to ``{scope}meta.json``; with no such axes the prefix is empty and the JSON is merged into
``meta.json``. Inside a scope, ``replicated`` files are written by data rank 0 and ``per_rank`` files by
every data rank as ``{name}_rank{data_rank}``.

Every part is collected in memory first (the strategy may run collectives while collecting, e.g. to
gather 16-bit weights); only then is anything written, inside the atomic protocol, without collectives.
The strategy's ``layout`` name is saved (``meta["strategy"]``); loading optimizer state under another
layout is refused naming both, before anything changes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..params import shard_axis
from . import checkpoint as protocol
from .checkpoint import CheckpointError

__all__ = ["StateWriter", "StateReader", "ModuleFiles", "save_engine", "load_engine", "check_model_tensors",
           "split_client_state", "join_client_state", "sharded_names", "frozen_names", "engine_meta", "restore_engine_state", "found_layout"]


_TENSOR_REF = "__ds_tensor__"  #: JSON marker of a tensor nested in client_state, stored in client.safetensors


def _key_path(path: tuple) -> str:
    return "client_state" + "".join(f"[{k!r}]" for k in path)


def split_client_state(client_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``client_state`` -> (tensors for ``client.safetensors``, the rest as JSON).

    Top-level tensors keep their key; a tensor nested in dicts, lists or tuples (Lightning's callback
    state) is replaced by ``{"__ds_tensor__": name}`` and stored under that name. Tuples come back as
    lists. A value that is neither a tensor nor JSON is refused naming its key path.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path: tuple):
        if isinstance(value, torch.Tensor):
            name = "/".join(str(k) for k in path)
            while name in tensors:
                name += "'"
            tensors[name] = value.detach()
            return {_TENSOR_REF: name}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) and not (isinstance(k, (int, float, bool)) or k is None):
                    raise CheckpointError(
                        f"{_key_path(path)} has the key {k!r} ({type(k).__name__}): client_state keys must be "
                        f"strings (or numbers, saved as strings); convert that key before saving")
                out[k] = walk(v, path + (k,))
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise CheckpointError(
            f"{_key_path(path)} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
            f"cannot store: client_state must hold tensors and JSON values (numbers, strings, lists, dicts, "
            f"nested in any way); convert that value (e.g. to a dict or a string) before saving")

    rest = {}
    for key, value in client_state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
        else:
            rest[key] = walk(value, (key,))
    return tensors, rest


def join_client_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Undo :func:`split_client_state`: the JSON with its tensor markers replaced, plus top-level tensors."""
    used: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            if set(value) == {_TENSOR_REF}:
                name = value[_TENSOR_REF]
                if name not in tensors:
                    raise CheckpointError(f"client_state refers to tensor {name!r}, which client.safetensors does "
                                          f"not hold: the checkpoint is incomplete; load an earlier one")
                used.add(name)
                return tensors[name]
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out = {k: walk(v) for k, v in meta.items()}
    out.update({k: v for k, v in tensors.items() if k not in used})
    return out


def check_model_tensors(module: torch.nn.Module, saved: dict[str, torch.Tensor], where,
                        other_ranks: set[str] = frozenset(), skip: set[str] = frozenset(),
                        strict: bool = True) -> None:
    """Raise listing every missing, unexpected or differently shaped tensor.

    ``other_ranks`` are sharded tensors saved by other ranks (experts this rank does not hold);
    ``skip`` are keys the strategy checks itself. ``strict=False`` (``load_module_strict=False``)
    allows missing and unexpected tensors; a shape mismatch is always an error.
    """
    current = {k: v for k, v in module.state_dict().items() if k not in skip}
    missing = sorted(set(current) - set(saved)) if strict else []
    unexpected = sorted(set(saved) - set(current) - set(other_ranks) - set(skip)) if strict else []
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
              for k in sorted(set(current) & set(saved)) if saved[k].shape != current[k].shape]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {where} does not fit this model:"]
        if missing:
            lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:10]))
        lines.append("  load a checkpoint saved from the same model definition")
        raise CheckpointError("\n".join(lines))


def frozen_names(module: torch.nn.Module) -> list[str]:
    """State-dict names of parameters that do not train (``requires_grad=False``), tied names included."""
    return [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]


def sharded_names(module: torch.nn.Module, outer_axes=()) -> set[str]:
    """Names of parameters that differ across data ranks of one scope (tagged with a shard axis that
    is not one of the scope's ``outer_axes``: experts)."""
    return {name for name, p in module.named_parameters()
            if shard_axis(p) is not None and shard_axis(p) not in outer_axes}


# -- collecting and reading one rank's part --------------------------------------------------------

class StateWriter:
    """One rank's part of a checkpoint, collected before anything is written (see the module docstring)."""

    def __init__(self, rank: int, scope: str = "", data_rank: int = 0) -> None:
        self.rank, self.scope, self.data_rank = rank, scope, data_rank
        self.meta: dict[str, Any] = {}  #: the scope's JSON (``meta.json`` when the scope is empty)
        self.rank_meta: dict[str, Any] = {}  #: this rank's JSON (``rng_rank{r}.json``)
        self._files: list[tuple[str, str | None, dict[str, torch.Tensor], dict | None]] = []

    def replicated(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                   scoped: bool = True) -> None:
        """Tensors equal on every data rank of the scope: written once, as ``{scope}{name}.safetensors``
        (``scoped=False``: ``{name}.safetensors``, for files named by something global, such as the
        pipeline's per-layer files). With ``metadata`` the file is written as given (no tied-storage
        aliases), with that header metadata (``{"format": "pt"}`` for files other libraries load)."""
        if self.data_rank == 0:
            self._files.append((f"{self.scope if scoped else ''}{name}", name if scoped else None, tensors,
                                metadata))

    def per_rank(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """This rank's own tensors: ``{scope}{name}_rank{data_rank}.safetensors``."""
        self._files.append((f"{self.scope}{name}_rank{self.data_rank}", None, tensors, None))

    def write(self, directory: Path, engine_meta: dict | None = None, rng: tuple | None = None,
              client: dict[str, torch.Tensor] | None = None) -> None:
        """Write everything collected into ``directory`` (inside the atomic protocol; no collectives).
        ``engine_meta`` and ``client`` (the tensors of ``client_state``): the run's, on global rank 0 only."""
        aliases: dict[str, dict[str, str]] = {}
        for stem, key, tensors, metadata in self._files:
            path = directory / f"{stem}.safetensors"
            if metadata is not None:
                protocol.tensors_to_safetensors(tensors, path, dedupe=False, metadata=metadata)
                continue
            found = protocol.tensors_to_safetensors(tensors, path)
            if key is not None:
                aliases[key] = found
        if rng is not None:
            protocol.tensors_to_safetensors(rng[0], directory / f"rng_rank{self.rank}.safetensors")
        protocol.write_json(directory / f"rng_rank{self.rank}.json", {**(rng[1] if rng else {}), **self.rank_meta})
        scope_meta = {**self.meta, "aliases": aliases}
        if self.scope and self.data_rank == 0:
            protocol.write_json(directory / f"{self.scope}meta.json", scope_meta, indent=1)
        if engine_meta is not None:
            meta = {**engine_meta, "format": protocol.FORMAT, **(scope_meta if not self.scope else {"aliases": {}})}
            meta["aliases"] = {**meta["aliases"],
                               "client": protocol.tensors_to_safetensors(client or {}, directory / "client.safetensors")}
            protocol.write_json(directory / "meta.json", meta, indent=1)


def found_layout(meta: dict) -> tuple[str, str]:
    """(layout, description) of the strategy that wrote ``meta`` (a scope's JSON); checkpoints from before
    layouts were recorded are recognised by their ZeRO entry."""
    strategy = meta.get("strategy")
    if strategy:
        return strategy["layout"], f"{strategy.get('name', strategy['layout'])} state"
    zero = meta.get("zero")
    if zero is None:
        return "replicated", "data parallel (stage 0) state"
    if zero.get("layout") == "per_parameter":
        return "zero-3", "ZeRO stage 3 state"
    return "zero", f"ZeRO stage {zero.get('stage', '1-2')} state"


class StateReader:
    """One rank's view of a checkpoint being loaded: the scope's JSON and files, this rank's JSON, the
    saved module tensors, and :meth:`load_module`, which puts them into the module."""

    def __init__(self, path: Path, meta: dict, files: dict, rank_meta: dict, scope: str = "",
                 data_rank: int = 0, module_loader=None) -> None:
        self.path, self.scope, self.data_rank = path, scope, data_rank
        self.engine_meta = meta
        self.rank_meta = rank_meta
        if scope:
            scope_file = path / f"{scope}meta.json"
            self.meta = protocol.read_json(scope_file) if scope_file.is_file() else None
            self._files: dict[str, dict] = {}
        else:
            self.meta = meta
            self._files = dict(files)
        if self.meta is None:  # saved under another topology: no state for this scope
            self.meta = {}
            self.layout, self.layout_name = None, f"no strategy state for {scope[:-1]}"
        else:
            self.layout, self.layout_name = found_layout(self.meta)
        self._module_loader = module_loader
        self.module_loaded = False

    def replicated(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors of ``{scope}{name}.safetensors`` (None when the checkpoint has no such file)."""
        if name not in self._files:
            file = self.path / f"{self.scope}{name}.safetensors"
            if not file.is_file():
                return None
            self._files[name] = protocol.load_safetensors(file, self.meta.get("aliases", {}).get(name, {}))
        return self._files[name]

    def rank_file(self, name: str, data_rank: int | None = None) -> Path:
        """The path of ``{scope}{name}_rank{r}.safetensors`` (this rank's by default)."""
        return self.path / f"{self.scope}{name}_rank{self.data_rank if data_rank is None else data_rank}.safetensors"

    def per_rank(self, name: str, data_rank: int | None = None) -> dict[str, torch.Tensor] | None:
        file = self.rank_file(name, data_rank)
        return protocol.load_safetensors(file) if file.is_file() else None

    def rank_files(self, name: str) -> list[Path]:
        """Every saved ``{scope}{name}_rank*.safetensors``, in rank order."""
        files = list(self.path.glob(f"{self.scope}{name}_rank*.safetensors"))
        return sorted(files, key=lambda f: int(f.stem.rsplit("_rank", 1)[1]))

    def module_state(self) -> dict[str, torch.Tensor]:
        """Every module tensor the checkpoint holds for this scope (model files merged)."""
        return self._module_loader.saved(self) if self._module_loader is not None else {}

    def load_module(self) -> None:
        """Load the saved module weights into the module (keys the strategy owns excluded); idempotent.
        A strategy calls it in ``load`` once its own checks passed, then restores its state."""
        if not self.module_loaded and self._module_loader is not None:
            self._module_loader.load(self)
        self.module_loaded = True


# -- the engine's module files -----------------------------------------------------------------------

class ModuleFiles:
    """The module layout of the engine: ``model.safetensors`` + ``model_rank{r}`` for sharded parameters."""

    def __init__(self, module: torch.nn.Module, outer_axes=(), skip: set[str] = frozenset()) -> None:
        self.module, self.outer_axes, self.skip = module, tuple(outer_axes), set(skip)
        self._saved: tuple[dict, set] | None = None

    def save(self, writer: StateWriter, exclude_frozen: bool = False) -> dict:
        """Add the module files; ``exclude_frozen`` leaves out parameters with ``requires_grad=False``
        (recorded, so loading does not count them as missing)."""
        frozen = set(frozen_names(self.module)) if exclude_frozen else set()
        state = {k: v for k, v in self.module.state_dict().items() if k not in self.skip and k not in frozen}
        sharded = sharded_names(self.module, self.outer_axes)
        writer.replicated("model", {k: v for k, v in state.items() if k not in sharded})
        if sharded:
            writer.per_rank("model", {k: state[k] for k in sharded if k in state})
        return {"sharded": sorted(sharded), **({"frozen_excluded": sorted(frozen)} if frozen else {})}

    def saved(self, reader: StateReader) -> dict[str, torch.Tensor]:
        return self._read(reader)[0]

    def _read(self, reader: StateReader) -> tuple[dict, set]:
        if self._saved is None:
            saved = dict(reader.replicated("model") or {})
            other_ranks: set[str] = set()
            for shard_file in reader.rank_files("model"):
                shard = protocol.load_safetensors(shard_file)
                other_ranks |= set(shard)
                saved.update(shard)
            self._saved = (saved, other_ranks)
        return self._saved

    def check(self, reader: StateReader, strict: bool = True) -> None:
        saved, other_ranks = self._read(reader)
        excluded = set(reader.meta.get("frozen_excluded", ()))
        check_model_tensors(self.module, saved, reader.path, other_ranks, self.skip | excluded, strict)

    def load(self, reader: StateReader) -> None:
        saved, _ = self._read(reader)
        own = self.module.state_dict()
        with torch.no_grad():
            self.module.load_state_dict({k: v for k, v in saved.items() if k in own and k not in self.skip},
                                        strict=False)


# -- engine JSON -------------------------------------------------------------------------------------

def engine_meta(engine, client_meta: dict) -> dict:
    """The JSON every checkpoint saves about the run: config, counters, world layout, scheduler, scaler."""
    scaler = engine.loss_scaler
    return {
        "config": engine.config.raw,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "micro_steps": engine.micro_steps,
        "world_size": engine.world_size,
        "dp_world_size": engine.dp_world_size,
        "precision": engine.precision,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": scaler.state_dict() if scaler else None,
        "client_state": client_meta,
    }


def restore_engine_state(engine, meta: dict, counters: bool, scheduler: bool) -> None:
    """Undo :func:`engine_meta`: loss scaler and counters (with the optimizer state), and scheduler."""
    if counters:
        if meta.get("loss_scaler") and engine.loss_scaler is not None:
            engine.loss_scaler.load_state_dict(meta["loss_scaler"])
        engine.global_steps = meta["global_steps"]
        engine.global_samples = meta["global_samples"]
        engine.micro_steps = meta["micro_steps"]
        engine.skipped_steps = meta.get("skipped_steps", 0)
    if scheduler and meta.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])


def _strategy_name(strategy) -> str:
    return getattr(strategy, "name", type(strategy).__name__)


# -- save and load -----------------------------------------------------------------------------------

def save_engine(engine, save_dir, tag: str, client_state: dict, module_files=None, extra_meta=None,
                exclude_frozen: bool = False) -> Path:
    """Collect the module files, the strategy's state and the engine's JSON; write them atomically.
    ``exclude_frozen``: leave parameters with ``requires_grad=False`` out of the module files."""
    strategy = engine.strategy
    client_tensors, client_meta = split_client_state(client_state)
    writer = StateWriter(engine.global_rank, engine.scope, engine.data_rank)
    strategy.save(writer)  # may run collectives (all ranks are here): nothing is written yet
    module_files = module_files or engine.module_files()
    writer.meta.update(module_files.save(writer, exclude_frozen=True) if exclude_frozen else module_files.save(writer))
    writer.meta["strategy"] = {"layout": strategy.layout, "name": _strategy_name(strategy),
                               "data_world_size": engine.dp_world_size}
    meta = {**engine_meta(engine, client_meta), **(extra_meta or {})} if engine.global_rank == 0 else None
    rng = protocol.rng_state()
    with protocol.writing_checkpoint(save_dir, tag, engine.global_rank) as partial:
        writer.write(partial, meta, rng, client_tensors)
    return Path(save_dir) / tag


def load_engine(engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool,
                module_files=None, check=None, strict: bool = True):
    """Check, then load the module files, the strategy's state and the engine's JSON.

    ``check(reader)``: an extra check of the caller's (the pipeline's), run before anything changes.
    """
    strategy = engine.strategy
    path = protocol.resolve_tag(load_dir, tag)
    meta, files, (rng_tensors, rng_meta) = protocol.load_tree(path, engine.global_rank)
    module_files = module_files or engine.module_files()
    reader = StateReader(path, meta, files, rng_meta, engine.scope, engine.data_rank, module_files)
    if check is not None:
        check(reader)
    if load_optimizer_states and reader.layout != strategy.layout:
        raise CheckpointError(
            f"{path} holds {reader.layout_name} (layout {reader.layout!r}); this run's "
            f"{_strategy_name(strategy)} expects layout {strategy.layout!r}: load it with the strategy it was "
            f"saved with, or pass load_optimizer_states=False to take the model weights only (nothing was changed)")
    if strict:
        module_files.check(reader)
    else:  # load_module_strict=False: missing and unexpected module tensors are allowed
        module_files.check(reader, strict=False)
    if meta["world_size"] != engine.world_size:
        warnings.warn(f"{path} was saved by {meta['world_size']} ranks and is loaded by {engine.world_size}: "
                      f"per-rank random-number streams restart from the saved ranks'", stacklevel=3)
    strategy.load(reader, load_optimizer_states)
    if not reader.module_loaded:  # a strategy that did not load the module itself: masters follow it
        reader.load_module()
        strategy.sync_from_module()
    restore_engine_state(engine, meta, load_optimizer_states, load_lr_scheduler_states)
    protocol.set_rng_state(rng_tensors, rng_meta)
    return str(path), join_client_state(meta["client_state"], files.get("client", {}))
