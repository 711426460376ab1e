"""Pipeline checkpoints: one safetensors file per layer, so any number of stages can load them.

Layout of ``save_dir/tag/``:

- ``layer_XX-model_states.safetensors``: layer ``XX``'s state dict (global layer index; a tied module
  is stored once, under the first index that uses it), written by data rank 0 of its stage;
- ``optim_states_pp{s}_dp{d}.safetensors`` / ``.json``: each rank's optimizer state (reloadable by the
  same topology only: it follows the stage's parameters);
- ``meta.json``: layer names, stage boundaries, counters, scheduler, config, JSON ``client_state``
  (its tensors in ``client.safetensors``); ``rng_rank{r}.safetensors`` / ``.json`` per rank.

Written into ``save_dir/.tag.partial`` and renamed into place only after every rank succeeded, then
``save_dir/latest`` names the tag — ds-core's directory protocol (``ds_core.engine.checkpoint``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ds_core.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    join_optimizer_state,
    resolve_tag,
    rng_state,
    set_rng_state,
    split_optimizer_state,
    tensors_to_safetensors,
    writing_checkpoint,
)
from ds_core.engine.checkpoint_layout import split_client_state

__all__ = ["save", "load", "layer_file"]


def layer_file(idx: int) -> str:
    return f"layer_{idx:02d}-model_states.safetensors"


def _layer_states(module) -> dict[int, dict[str, torch.Tensor]]:
    """Global layer index -> state dict, for the layers (and first tied uses) this stage holds."""
    out = {idx: layer.state_dict() for idx, layer in module.local_layers.items()}
    for key, tied in module.tied_modules.items():
        first = module.tied_indices[key][0]
        if module.stage_of(first) == module.stage_id:
            out[first] = tied.state_dict()
    return out


def _coords(engine) -> tuple[int, int]:
    c = engine.topology.coordinates(engine.global_rank)
    return c["pipe"], c["data"]


def save(engine, save_dir, tag: str, client_state: dict):
    rank, (stage, data) = engine.global_rank, _coords(engine)
    opt, module, core = engine.optimizer, engine.module, engine.core
    with writing_checkpoint(save_dir, tag, rank) as partial:
        if data == 0:
            for idx, state in _layer_states(module).items():
                tensors_to_safetensors(state, partial / layer_file(idx))
        opt_tensors, opt_meta = split_optimizer_state(opt.state_dict())
        if hasattr(opt, "flat_master"):
            opt_tensors["flat_master"] = opt.flat_master
        name = f"optim_states_pp{stage}_dp{data}"
        tensors_to_safetensors(opt_tensors, partial / f"{name}.safetensors")
        opt_meta["loss_scaler"] = opt.scaler.state_dict() if getattr(opt, "scaler", None) else None
        (partial / f"{name}.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = rng_state()
        tensors_to_safetensors(rng_tensors, partial / f"rng_rank{rank}.safetensors")
        (partial / f"rng_rank{rank}.json").write_text(json.dumps(rng_meta))
        if rank == 0:
            client_tensors, client_meta = split_client_state(client_state)
            tensors_to_safetensors(client_tensors, partial / "client.safetensors")
            meta = {"format": FORMAT, "kind": "pipeline", "config": core.config.raw,
                    "layer_names": module.layer_names, "parts": module.parts, "num_stages": module.num_stages,
                    "dp_world_size": core.dp_world_size, "world_size": core.world_size,
                    "global_steps": core.global_steps, "global_samples": core.global_samples,
                    "micro_steps": core.micro_steps, "precision": core.precision, "aliases": {},
                    "lr_scheduler": core.lr_scheduler.state_dict() if core.lr_scheduler is not None else None,
                    "client_state": client_meta}
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    return Path(save_dir) / tag


def _load_layers(module, path: Path) -> None:
    targets = {idx: layer for idx, layer in module.local_layers.items()}
    for key, tied in module.tied_modules.items():
        targets[module.tied_indices[key][0]] = tied
    for idx, layer in sorted(targets.items()):
        f = path / layer_file(idx)
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: layer {idx} ({module.layer_names[idx]}) was not saved; "
                                  f"load a checkpoint written by this model")
        try:
            with torch.no_grad():
                layer.load_state_dict(load_file(str(f)))
        except RuntimeError as exc:
            raise CheckpointError(f"{f} does not fit layer {idx} ({module.layer_names[idx]}): {exc}") from None


def load(engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
    path = resolve_tag(load_dir, tag)
    meta = json.loads((path / "meta.json").read_text())
    module, core, opt = engine.module, engine.core, engine.optimizer
    if meta.get("kind") != "pipeline":
        raise CheckpointError(f"{path} was not written by a pipeline engine; load it with the engine that saved it")
    if meta["layer_names"] != module.layer_names:
        raise CheckpointError(f"{path} holds layers {meta['layer_names']} but this PipelineModule has "
                              f"{module.layer_names}; load a checkpoint of the same layer list")
    same = (meta["parts"] == module.parts and meta["dp_world_size"] == core.dp_world_size)
    if load_optimizer_states and not same:
        raise CheckpointError(
            f"{path} was saved with stage boundaries {meta['parts']} × {meta['dp_world_size']} data ranks; this "
            f"run has {module.parts} × {core.dp_world_size}: layers reload under any partition, optimizer state "
            f"does not — pass load_optimizer_states=False (or load_module_only=True)")
    _load_layers(module, path)
    stage, data = _coords(engine)
    if load_optimizer_states:
        name = f"optim_states_pp{stage}_dp{data}"
        tensors = load_file(str(path / f"{name}.safetensors"))
        opt_meta = json.loads((path / f"{name}.json").read_text())
        master = tensors.pop("flat_master", None)
        opt.load_state_dict(join_optimizer_state(tensors, opt_meta))
        if master is not None and hasattr(opt, "flat_master"):
            opt.flat_master.copy_(master)
        if opt_meta.get("loss_scaler") and getattr(opt, "scaler", None):
            opt.scaler.load_state_dict(opt_meta["loss_scaler"])
        core.global_steps, core.global_samples = meta["global_steps"], meta["global_samples"]
        core.micro_steps = meta["micro_steps"]
        rng_file = path / f"rng_rank{engine.global_rank}.safetensors"
        set_rng_state(load_file(str(rng_file)), json.loads((path / f"rng_rank{engine.global_rank}.json").read_text()))
    else:
        if hasattr(opt, "flat_master"):  # masters follow the freshly loaded weights
            with torch.no_grad():
                for p in opt.grads.params:
                    opt.master_of(p).copy_(p.float())
        if core.precision != "fp32" and not hasattr(opt, "flat_master"):
            warnings.warn("optimizer masters were not refreshed from the loaded 16-bit weights", stacklevel=3)
    if load_lr_scheduler_states and meta.get("lr_scheduler") and core.lr_scheduler is not None:
        core.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    client = dict(meta["client_state"])
    client_file = path / "client.safetensors"
    if client_file.exists():
        client.update(load_file(str(client_file)))
    return str(path), client
