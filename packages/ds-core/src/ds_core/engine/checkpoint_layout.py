"""The default checkpoint layout: replicated data-parallel state, written once by rank 0.

Features that partition state (ZeRO) provide their own layout through the ``checkpoint_layout``
component; the directory protocol in ``checkpoint.py`` (atomic rename, ``latest``) is shared.
"""

from __future__ import annotations

import json
import warnings

import torch

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

__all__ = ["DefaultLayout", "check_model_tensors", "split_client_state"]


def split_client_state(client_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {k: v for k, v in client_state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in client_state.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(rest)
    except TypeError as exc:
        raise CheckpointError(f"client_state must hold tensors and JSON values (numbers, strings, "
                              f"lists, dicts): {exc}; convert that value before saving") from None
    return tensors, rest


def check_model_tensors(module: torch.nn.Module, saved: dict[str, torch.Tensor], where) -> None:
    """Raise listing every missing, unexpected or differently shaped tensor."""
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
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


class DefaultLayout:
    def save(self, engine, save_dir, tag: str, client_state: dict):
        opt = engine.optimizer
        opt_tensors, opt_meta = split_optimizer_state(opt.state_dict())
        client_tensors, client_meta = split_client_state(client_state)
        files = {"model": engine.module.state_dict(), "optimizer": opt_tensors, "client": client_tensors}
        if getattr(opt, "precision", "fp32") != "fp32":
            files["master"] = {"flat": opt.flat_master}
        meta = {
            "config": engine.config.raw,
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "micro_steps": engine.micro_steps,
            "world_size": engine.world_size,
            "dp_world_size": engine.dp_world_size,
            "precision": engine.precision,
            "optimizer": opt_meta,
            "skipped_steps": engine.skipped_steps,
            "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "loss_scaler": opt.scaler.state_dict() if getattr(opt, "scaler", None) else None,
            "client_state": client_meta,
        }
        rng_tensors, rng_meta = rng_state()
        return save_tree(save_dir, tag, {"files": files, "meta": meta},
                         {"files": {"rng": rng_tensors}, "meta": rng_meta}, engine.global_rank)

    def load(self, engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        path = resolve_tag(load_dir, tag)
        meta, files, (rng_tensors, rng_meta) = load_tree(path, engine.global_rank)
        check_model_tensors(engine.module, files["model"], path)
        if meta["world_size"] != engine.world_size:
            warnings.warn(f"{path} was saved by {meta['world_size']} ranks and is loaded by "
                          f"{engine.world_size}: model and optimizer state are replicated so they load "
                          f"exactly, but per-rank random-number streams restart from rank 0's", stacklevel=3)
        opt = engine.optimizer
        with torch.no_grad():
            engine.module.load_state_dict(files["model"])
            if "master" in files and getattr(opt, "precision", "fp32") != "fp32":
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
            if meta.get("loss_scaler") and getattr(opt, "scaler", None):
                opt.scaler.load_state_dict(meta["loss_scaler"])
            engine.global_steps = meta["global_steps"]
            engine.global_samples = meta["global_samples"]
            engine.micro_steps = meta["micro_steps"]
            if hasattr(opt, "skipped_steps"):
                opt.skipped_steps = meta.get("skipped_steps", 0)
        if load_lr_scheduler_states and meta.get("lr_scheduler") and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        set_rng_state(rng_tensors, rng_meta)
        client = dict(meta["client_state"])
        client.update(files.get("client", {}))
        return str(path), client
