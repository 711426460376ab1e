"""The default checkpoint layout: replicated data-parallel state, written once by rank 0.

Features that partition state (ZeRO) provide their own layout through the ``checkpoint_layout``
component; the directory protocol in ``checkpoint.py`` (atomic rename, ``latest``) is shared.
"""

from __future__ import annotations

import json
import warnings

import torch
from safetensors.torch import load_file

from ..params import shard_axis
from .checkpoint import (
    CheckpointError,
    join_optimizer_state,
    load_tree,
    resolve_tag,
    rng_state,
    save_tree,
    set_rng_state,
    split_optimizer_state,
)

__all__ = ["DefaultLayout", "check_model_tensors", "split_client_state", "sharded_names", "engine_meta",
           "restore_engine_state"]


def split_client_state(client_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {k: v for k, v in client_state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in client_state.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(rest)
    except TypeError as exc:
        raise CheckpointError(f"client_state must hold tensors and JSON values (numbers, strings, "
                              f"lists, dicts): {exc}; convert that value before saving") from None
    return tensors, rest


def check_model_tensors(module: torch.nn.Module, saved: dict[str, torch.Tensor], where,
                        other_ranks: set[str] = frozenset()) -> None:
    """Raise listing every missing, unexpected or differently shaped tensor.

    ``other_ranks`` are sharded tensors saved by other ranks (experts this rank does not hold).
    """
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current) - set(other_ranks))
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


def engine_meta(engine, client_meta: dict) -> dict:
    """The JSON every layout saves about the run: config, counters, world layout, scheduler, scaler."""
    scaler = getattr(engine.optimizer, "scaler", None)
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
    opt = engine.optimizer
    if counters:
        if meta.get("loss_scaler") and getattr(opt, "scaler", None):
            opt.scaler.load_state_dict(meta["loss_scaler"])
        engine.global_steps = meta["global_steps"]
        engine.global_samples = meta["global_samples"]
        engine.micro_steps = meta["micro_steps"]
        if hasattr(opt, "skipped_steps"):
            opt.skipped_steps = meta.get("skipped_steps", 0)
    if scheduler and meta.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])


def sharded_names(module: torch.nn.Module) -> set[str]:
    """Names of parameters that differ across ranks (tagged with a shard axis, e.g. experts), every
    name of a tied one included (each rank saves its own)."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if shard_axis(p) is not None}


class DefaultLayout:
    """Replicated state from rank 0; sharded parameters (experts) and, when there are any, each
    rank's optimizer state in per-rank files. Sharded parameters are stored under their module
    names, so a model that names experts by their global index reloads under another expert layout.
    """

    def save(self, engine, save_dir, tag: str, client_state: dict):
        opt = engine.optimizer
        opt_tensors, opt_meta = split_optimizer_state(opt.state_dict())
        client_tensors, client_meta = split_client_state(client_state)
        state = engine.module.state_dict()
        sharded = sharded_names(engine.module)
        files = {"model": {k: v for k, v in state.items() if k not in sharded},
                 "optimizer": opt_tensors, "client": client_tensors}
        if getattr(opt, "precision", "fp32") != "fp32":
            files["master"] = {"flat": opt.flat_master}
        meta = {**engine_meta(engine, client_meta), "optimizer": opt_meta, "sharded": sorted(sharded)}
        rng_tensors, rng_meta = rng_state()
        per_rank = {"rng": rng_tensors}
        if sharded:  # every rank holds state nobody else has
            per_rank["model"] = {k: state[k] for k in sharded}
            per_rank["optimizer"] = opt_tensors
            per_rank["master"] = files.get("master", {})
            rng_meta = {**rng_meta, "optimizer": opt_meta}
        return save_tree(save_dir, tag, {"files": files, "meta": meta},
                         {"files": per_rank, "meta": rng_meta}, engine.global_rank)

    def load(self, engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        path = resolve_tag(load_dir, tag)
        meta, files, (rng_tensors, rng_meta) = load_tree(path, engine.global_rank)
        saved = dict(files["model"])
        other_ranks: set[str] = set()
        for shard_file in sorted(path.glob("model_rank*.safetensors")):
            shard = load_file(str(shard_file))
            other_ranks |= set(shard)
            saved.update(shard)
        check_model_tensors(engine.module, saved, path, other_ranks)
        own = sharded_names(engine.module)
        same_layout = meta["world_size"] == engine.world_size and set(meta.get("sharded", [])) <= other_ranks
        if meta["world_size"] != engine.world_size:
            warnings.warn(f"{path} was saved by {meta['world_size']} ranks and is loaded by "
                          f"{engine.world_size}: replicated state loads exactly, but per-rank random-number "
                          f"streams restart from rank 0's", stacklevel=3)
        if own and load_optimizer_states and not same_layout:
            raise CheckpointError(f"{path}: sharded parameters (experts) were saved by {meta['world_size']} "
                                  f"ranks; optimizer state cannot follow them to {engine.world_size} ranks: "
                                  f"pass load_optimizer_states=False to load the parameters only")
        rank_file = path / f"optimizer_rank{engine.global_rank}.safetensors"
        if own and same_layout:
            files["optimizer"] = load_file(str(rank_file))
            meta["optimizer"] = rng_meta["optimizer"]
            master_file = path / f"master_rank{engine.global_rank}.safetensors"
            if "master" in files and master_file.exists():
                files["master"] = load_file(str(master_file))
        opt = engine.optimizer
        with torch.no_grad():
            engine.module.load_state_dict({k: v for k, v in saved.items() if k in engine.module.state_dict()})
            if "master" in files and (not own or same_layout) and getattr(opt, "precision", "fp32") != "fp32":
                opt.flat_master.copy_(files["master"]["flat"])
            elif getattr(opt, "precision", "fp32") != "fp32":
                for p in opt.grads.params:
                    opt.master_of(p).copy_(p.float())
        if load_optimizer_states:
            state = join_optimizer_state(files["optimizer"], meta["optimizer"])
            if len(state["param_groups"]) != len(opt.param_groups):
                raise CheckpointError(f"{path}: optimizer has {len(state['param_groups'])} parameter "
                                      f"groups, this run has {len(opt.param_groups)}; pass "
                                      f"load_optimizer_states=False to load the model only")
            opt.load_state_dict(state)
        restore_engine_state(engine, meta, load_optimizer_states, load_lr_scheduler_states)
        set_rng_state(rng_tensors, rng_meta)
        client = dict(meta["client_state"])
        client.update(files.get("client", {}))
        return str(path), client
