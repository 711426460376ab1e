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
gathered before anything is written and written inside the atomic directory protocol with the rest,
so ``latest`` never names a checkpoint without it.

Loading reads, for each parameter, only the pieces of the saved shards that overlap this rank's new
shard (``safe_open(...).get_slice``), the same re-partitioning idea as stages 1-2 ("universal
checkpoint"), but per parameter. A stage 0-2 checkpoint loads into a stage-3 run with
``load_optimizer_states=False`` (its ``model.safetensors`` weights are sharded).
"""

from __future__ import annotations

import warnings

import torch
from safetensors import safe_open

from ds_core.engine.checkpoint import CheckpointError

from .checkpoint import SCALARS_KEY, layout_differences, partition_tensors
from .stage3 import gather_shards

__all__ = ["save_shards", "load_shards", "managed_names", "gathered_state_dict"]


def managed_names(module: torch.nn.Module, parts) -> dict[str, str]:
    """Every state-dict name of a partitioned parameter -> the name its shard is saved under."""
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        s = parts.by_param.get(id(p))
        if s is not None:
            out[name] = s.name
    return out


def gathered_state_dict(engine, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full module state (model dtype, host memory), gathering one parameter at a time.

    A collective: every rank must call it. With ``rank0_only`` other ranks return ``{}``.
    """
    return _gathered(engine.module, engine.strategy.parts, not rank0_only or engine.global_rank == 0)


def _gathered(module: torch.nn.Module, parts, keep: bool) -> dict[str, torch.Tensor]:
    names = managed_names(module, parts)
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
    state = module.state_dict()
    for key, value in state.items():
        if not keep:
            continue
        # tied names get separate copies, so a plain reader finds every key
        out[key] = by_saved[names[key]].clone() if key in names else value.detach().to("cpu", copy=True)
    return out


def save_shards(strategy, writer) -> None:
    """Add this rank's shards and their optimizer state (and, on rank 0, the 16-bit weights) to ``writer``."""
    opt, parts, cfg = strategy.zero, strategy.parts, strategy.cfg
    part_tensors, opt_meta = partition_tensors(opt)
    names = managed_names(strategy.ctx.module, parts)
    writer.meta["zero"] = {"stage": 3, **parts.describe(), "param_groups": opt_meta["param_groups"],
                           "aliases": {k: v for k, v in names.items() if k != v}}
    writer.per_rank("zero", part_tensors)
    writer.rank_meta[SCALARS_KEY] = opt_meta["scalars"]
    if cfg.stage3_gather_16bit_weights_on_model_save or cfg.stage3_gather_fp16_weights_on_model_save:
        full = _gathered(strategy.ctx.module, parts, writer.rank == 0)  # a collective: every rank gathers
        if writer.rank == 0:
            writer.replicated("model_16bit", {k: v.contiguous() for k, v in full.items()},
                              metadata={"format": "pt"})


def _check(reader, zero: dict, parts) -> None:
    diffs = layout_differences(zero, parts.describe())
    if diffs:
        raise CheckpointError(f"checkpoint {reader.path}: its ZeRO stage-3 layout does not match this model's "
                              f"parameter groups:\n  " + "\n  ".join(diffs[:10]) +
                              "\n  load it with the same model and parameter groups (nothing was changed)")
    for r in range(zero["world_size"]):
        if not reader.rank_file("zero", r).is_file():
            raise CheckpointError(f"{reader.rank_file('zero', r)} is missing: the checkpoint was saved by "
                                  f"{zero['world_size']} ranks and every rank's shards are needed")


def _reshard(reader, zero: dict, parts) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    world = zero["world_size"]
    handles = [safe_open(str(reader.rank_file("zero", r)), framework="pt") for r in range(world)]
    keys = list(handles[0].keys())
    masters, state = {}, {}
    for gi, g in enumerate(parts.groups):
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


def load_shards(strategy, reader, load_optimizer_states: bool) -> None:
    """Re-shard a stage-3 checkpoint to this run; a stage 0-2 checkpoint's full weights (model file) load
    with ``load_optimizer_states=False``: each rank keeps its shard of each."""
    opt, parts = strategy.zero, strategy.parts
    path, zero = reader.path, reader.meta.get("zero")
    stage3 = reader.layout == strategy.layout and zero is not None
    if stage3:
        _check(reader, zero, parts)
        if load_optimizer_states and len(zero["param_groups"]) != len(opt.param_groups):
            raise CheckpointError(f"{path}: optimizer has {len(zero['param_groups'])} parameter groups, "
                                  f"this run has {len(opt.param_groups)}; pass load_optimizer_states=False")
        if zero["world_size"] != parts.world:
            warnings.warn(f"{path} was saved by {zero['world_size']} data-parallel ranks and is loaded by "
                          f"{parts.world}: shards are re-sliced exactly, per-rank random-number "
                          f"streams restart from the saved ranks'", stacklevel=4)
        full = None
    else:
        full = reader.module_state()
        missing = sorted({s.name for g in parts.groups for s in g.sharded} - set(full))
        if missing:
            raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:10]}; load it "
                                  f"with the model it was saved from (nothing was changed)")
    # every check passed: from here on state changes
    reader.load_module()
    state = None
    with torch.no_grad():
        if stage3:
            masters, state = _reshard(reader, zero, parts)
            for gi, g in enumerate(parts.groups):
                if not opt.aliased:
                    opt.masters[gi].copy_(masters[gi])
                g.own().copy_(masters[gi])
        else:  # full weights of a stage 0-2 checkpoint: take this rank's shard of each
            for g in parts.groups:
                for s in g.sharded:
                    flat = full[s.name].reshape(-1)
                    lo, hi = min(s.numel, s.rank * s.part), min(s.numel, (s.rank + 1) * s.part)
                    s.shard.zero_()
                    s.shard[:hi - lo].copy_(flat[lo:hi])
            opt.reload_masters_from_model()
        parts.all_gather(0)  # refresh whole (persistent) parameters
    if load_optimizer_states and state is not None:
        for idx, entry in reader.rank_meta.get(SCALARS_KEY, {}).items():
            state.setdefault(int(idx), {}).update(entry)
        opt.optimizer.load_state_dict({"state": state, "param_groups": zero["param_groups"]})
