"""Stage-3 checkpoints: every rank saves its shards; loading re-shards them to any data-parallel size.

The directory protocol and files are those of stage 1/2 (``checkpoint.py``): ``zero_rank{r}.safetensors``
holds rank r's fp32 master shards ``master.{g}`` (each parameter's shard end to end, see ``stage3.py``)
and their optimizer state ``optim.{g}.{key}``; ``meta.json``'s ``zero`` entry records the
per-parameter layout (name, shape, offset and shard size of each parameter at the saving world size)
and ``aliases``: other names of tied parameters. ``model.safetensors`` holds only what is not
partitioned (buffers, frozen parameters): the model's parameters exist whole nowhere.

With ``stage3_gather_16bit_weights_on_model_save`` rank 0 also writes ``model_16bit.safetensors``:
the gathered module state in the model's dtype (every name of a tied parameter included), one
parameter gathered at a time — loadable without ds (e.g. ``safetensors.torch.load_file``). It is
written inside the checkpoint directory protocol, so a checkpoint ``latest`` names always has it.

Loading reads, for each parameter, only the pieces of the saved shards that overlap this rank's new
shard (``safe_open(...).get_slice``), the same re-partitioning idea as stages 1-2 ("universal
checkpoint"), but per parameter. A stage 0-2 checkpoint loads into a stage-3 run with
``load_optimizer_states=False`` (its ``model.safetensors`` weights are sharded).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from ds_core.engine.checkpoint import (
    CheckpointError,
    load_tree,
    resolve_tag,
    rng_state,
    save_tree,
    set_rng_state,
)
from ds_core.engine.checkpoint_layout import engine_meta, restore_engine_state, split_client_state

from .checkpoint import SCALARS_KEY, _partition_tensors, layout_differences
from .stage3 import gather_shards

__all__ = ["Stage3CheckpointLayout", "managed_names", "gathered_state_dict"]


def managed_names(engine) -> dict[str, str]:
    """Every state-dict name of a partitioned parameter -> the name its shard is saved under."""
    parts = engine.optimizer.parts
    out = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        s = parts.by_param.get(id(p))
        if s is not None:
            out[name] = s.name
    return out


def gathered_state_dict(engine, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full module state (model dtype, host memory), gathering one parameter at a time.

    A collective: every rank must call it. With ``rank0_only`` other ranks return ``{}``.
    """
    parts = engine.optimizer.parts
    keep = not rank0_only or engine.global_rank == 0
    names = managed_names(engine)
    out: dict[str, torch.Tensor] = {}
    by_saved: dict[str, torch.Tensor] = {}
    for g in parts.groups:
        for s in g.sharded:
            was = s.gathered
            if not was:
                gather_shards([s], parts.group)
            if keep:
                by_saved[s.name] = s.param.data.detach().to("cpu", copy=True)
            if not was:
                s.release()
    state = engine.module.state_dict()
    for key, value in state.items():
        if not keep:
            continue
        # tied names get separate copies, so a plain reader finds every key
        out[key] = by_saved[names[key]].clone() if key in names else value.detach().to("cpu", copy=True)
    return out


class Stage3CheckpointLayout:
    """Save every rank's shards; load and re-shard to this run's data-parallel size."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.gather_16bit = (cfg.stage3_gather_16bit_weights_on_model_save
                             or cfg.stage3_gather_fp16_weights_on_model_save)

    def save(self, engine, save_dir, tag: str, client_state: dict):
        opt = engine.optimizer
        part_tensors, opt_meta = _partition_tensors(opt)
        client_tensors, client_meta = split_client_state(client_state)
        names = managed_names(engine)
        meta = {
            **engine_meta(engine, client_meta),
            "zero": {"stage": 3, **opt.parts.describe(), "param_groups": opt_meta["param_groups"],
                     "aliases": {k: v for k, v in names.items() if k != v}},
        }
        rest = {k: v for k, v in engine.module.state_dict().items() if k not in names}
        rng_tensors, rng_meta = rng_state()
        files = {"model": rest, "client": client_tensors}
        per_rank = {"files": {"rng": rng_tensors, "zero": part_tensors},
                    "meta": {**rng_meta, SCALARS_KEY: opt_meta["scalars"]}}
        full = gathered_state_dict(engine) if self.gather_16bit else None  # a collective: before the protocol
        plain = {"model_16bit.safetensors": full} if full is not None else None
        return save_tree(save_dir, tag, {"files": files, "meta": meta}, per_rank, engine.global_rank, plain=plain)

    # -- load ----------------------------------------------------------------------------------------
    def _check(self, path: Path, zero: dict, opt) -> None:
        diffs = layout_differences(zero, opt.parts.describe())
        if diffs:
            raise CheckpointError(f"checkpoint {path}: its ZeRO stage-3 layout does not match this model's "
                                  f"parameter groups:\n  " + "\n  ".join(diffs[:10]) +
                                  "\n  load it with the same model and parameter groups (nothing was changed)")
        for r in range(zero["world_size"]):
            if not (path / f"zero_rank{r}.safetensors").is_file():
                raise CheckpointError(f"{path / f'zero_rank{r}.safetensors'} is missing: the checkpoint was "
                                      f"saved by {zero['world_size']} ranks and every rank's shards are needed")

    @staticmethod
    def _reshard(path: Path, zero: dict, opt) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
        world = zero["world_size"]
        handles = [safe_open(str(path / f"zero_rank{r}.safetensors"), framework="pt") for r in range(world)]
        keys = list(handles[0].keys())
        masters, state = {}, {}
        for gi, g in enumerate(opt.parts.groups):
            spec = zero["groups"][gi]
            elementwise = [k for k in keys if k.startswith(f"optim.{gi}.")
                           and list(handles[0].get_slice(k).get_shape()) == [spec["partition_numel"]]]

            def piece(key: str, g=g, spec=spec) -> torch.Tensor:
                sl = [h.get_slice(key) for h in handles]
                out = torch.zeros(g.partition_numel, dtype=sl[0][0:1].dtype)
                for s, o, saved in zip(g.sharded, g.offsets, spec["params"]):
                    lo, hi = s.rank * s.part, min(s.numel, (s.rank + 1) * s.part)
                    for r in range(world):  # saved rank r held [r·P', (r+1)·P') of this parameter
                        a, b = max(lo, r * saved["part"]), min(hi, (r + 1) * saved["part"])
                        if a < b:
                            src = saved["offset"] + a - r * saved["part"]
                            out[o + a - lo:o + b - lo] = sl[r][src:src + b - a]
                return out

            masters[gi] = piece(f"master.{gi}")
            entry = {}
            for key in keys:
                if key.startswith(f"optim.{gi}."):
                    entry[key.split(".", 2)[2]] = piece(key) if key in elementwise else handles[0].get_tensor(key)
            state[gi] = entry
        return masters, state

    def load(self, engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        path = resolve_tag(load_dir, tag)
        meta, files, (rng_tensors, rng_meta) = load_tree(path, engine.global_rank)
        opt = engine.optimizer
        names = managed_names(engine)
        saved_model = dict(files.get("model", {}))
        zero = meta.get("zero")
        stage3 = zero is not None and zero.get("layout") == "per_parameter"
        if not stage3 and load_optimizer_states:
            raise CheckpointError(f"{path} was saved at ZeRO stage {zero['stage'] if zero else 0}, this run is "
                                  f"at stage 3: pass load_optimizer_states=False to load its model weights "
                                  f"(the optimizer state cannot follow), or convert it with ds zero-to-fp32")
        own = engine.module.state_dict()
        expected = set(own) if not stage3 else set(own) - set(names)
        missing = sorted(expected - set(saved_model))
        if missing:
            raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:10]}; load it "
                                  f"with the model it was saved from (nothing was changed)")
        if stage3:
            self._check(path, zero, opt)
            if load_optimizer_states and len(zero["param_groups"]) != len(opt.param_groups):
                raise CheckpointError(f"{path}: optimizer has {len(zero['param_groups'])} parameter groups, "
                                      f"this run has {len(opt.param_groups)}; pass load_optimizer_states=False")
            if zero["world_size"] != opt.parts.world:
                warnings.warn(f"{path} was saved by {zero['world_size']} data-parallel ranks and is loaded by "
                              f"{opt.parts.world}: shards are re-sliced exactly, per-rank random-number "
                              f"streams restart from the saved ranks'", stacklevel=3)
        # every check passed: from here on state changes
        with torch.no_grad():
            engine.module.load_state_dict({k: v for k, v in saved_model.items() if k not in names}, strict=False)
            if stage3:
                masters, state = self._reshard(path, zero, opt)
                for gi, g in enumerate(opt.parts.groups):
                    if not opt.aliased:
                        opt.masters[gi].copy_(masters[gi])
                    g.own().copy_(masters[gi])
            else:  # full weights of a stage 0-2 checkpoint: take this rank's shard of each
                state = None
                for g in opt.parts.groups:
                    for s in g.sharded:
                        flat = saved_model[s.name].reshape(-1)
                        lo, hi = min(s.numel, s.rank * s.part), min(s.numel, (s.rank + 1) * s.part)
                        s.shard.zero_()
                        s.shard[:hi - lo].copy_(flat[lo:hi])
                opt.reload_masters_from_model()
            opt.parts.all_gather(0)  # refresh whole (persistent) parameters
        if load_optimizer_states and state is not None:
            for idx, entry in rng_meta.get(SCALARS_KEY, {}).items():
                state.setdefault(int(idx), {}).update(entry)
            opt.optimizer.load_state_dict({"state": state, "param_groups": zero["param_groups"]})
        restore_engine_state(engine, meta, load_optimizer_states and state is not None,
                             load_lr_scheduler_states)
        set_rng_state(rng_tensors, {k: v for k, v in rng_meta.items() if k != SCALARS_KEY})
        client = dict(meta["client_state"])
        client.update(files.get("client", {}))
        return str(path), client
