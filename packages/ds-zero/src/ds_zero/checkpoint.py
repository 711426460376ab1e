"""ZeRO checkpoints (the engine's ``checkpoint_layout`` component): partitions per rank, re-partitioned on load.

ds-core's directory protocol is reused (``save_tree``/``load_tree``/``resolve_tag``: everything is
written to ``.tag.partial`` and renamed only after every rank succeeded). Inside ``save_dir/tag/``:

- ``model.safetensors`` (rank 0): the full module state (parameters are replicated after each step);
- ``zero_rank{r}.safetensors`` (every rank): ``master.{g}`` — rank r's fp32 master partition of
  group g — and ``optim.{g}.{key}`` — its optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``...);
- ``meta.json``: counters, scheduler, loss scaler, client state, and ``zero``: the layout (stage,
  world size, and per group its numel, padded numel, partition numel and the name, shape and flat
  offset of every parameter), plus the optimizer's param groups;
- ``rng_rank{r}.*``: RNG states, and rank r's non-tensor optimizer state.

Loading compares that layout with the model first and raises :class:`CheckpointError` listing the
differences before anything changes. Because the unpadded flat order of a group does not depend on
the world size, a checkpoint loads at any data-parallel size: each rank reads just the pieces of
the saved partitions that overlap its new slice (``safe_open(...).get_slice``), which is the
"universal checkpoint" re-partitioning. Elementwise state (masters, moments) is re-sliced; scalar
state (``step``) is taken from rank 0.

Groups of tagged parameters (experts, partitioned over ``expert_data``; see ``partition.py``) differ
per expert rank: their parameters go to ``model_rank{r}.safetensors`` under their module names (as in
ds-core's default layout, so a model naming experts by global index reloads under another expert
layout), and each rank records its tagged groups' layout in ``rng_rank{r}.json``. Their masters and
optimizer state reload only under the same layout (same world size and tagged groups); otherwise
``load_optimizer_states=False`` loads the weights and rebuilds the masters from them.
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
from ds_core.engine.checkpoint_layout import (
    check_model_tensors,
    engine_meta,
    restore_engine_state,
    sharded_names,
    split_client_state,
)

__all__ = ["ZeroCheckpointLayout", "build", "layout_differences"]

SCALARS_KEY = "zero_optimizer_scalars"
TAGGED_KEY = "zero_tagged_groups"


def _tagged(parts) -> list[tuple[int, object]]:
    """(index, group) of the groups partitioned over another axis than data, or sharded over one."""
    return [(i, g) for i, g in enumerate(parts.groups) if g.axis != "data" or g.shard is not None]


def _data_only(layout: dict) -> dict:
    return {**layout, "groups": [g for g in layout["groups"] if "axis" not in g]}


def _partition_tensors(opt) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"master.{g}": m.detach() for g, m in enumerate(opt.masters)}
    scalars: dict[str, dict] = {}
    state = opt.optimizer.state_dict()
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def saved_data_ranks(meta: dict, engine) -> list[int]:
    """The saved ranks whose partitions this rank's data-parallel group re-slices: the data axis of this
    rank's coordinate on the other axes (tensor, sequence), which are innermost in the rank layout."""
    dp = meta["zero"]["world_size"]
    inner = meta["world_size"] // dp
    if inner == 1:
        return list(range(dp))
    topology = engine.topology
    if topology is not None and meta["world_size"] == engine.world_size and dp == engine.dp_world_size:
        return topology.ranks_along("data", engine.global_rank)  # the same layout
    here = engine.world_size // max(1, engine.dp_world_size)
    if topology is not None and topology.size("pipe") > 1:
        raise CheckpointError(f"a pipeline checkpoint with ZeRO partitions reloads only under the world size it was "
                              f"saved with ({meta['world_size']} ranks, {dp} data-parallel)")
    if here != inner:
        raise CheckpointError(f"the checkpoint was saved with {inner} ranks per data-parallel rank (tensor or "
                              f"sequence parallelism) and is loaded with {here}; ZeRO partitions cannot follow: "
                              f"consolidate it with `ds zero-to-fp32` and load the weights into the new layout")
    return [d * inner + engine.global_rank % inner for d in range(dp)]


def layout_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two ``Partitions.describe()`` layouts (world size aside)."""
    diffs = []
    if len(saved["groups"]) != len(current["groups"]):
        return [f"{len(saved['groups'])} parameter groups in the checkpoint vs {len(current['groups'])} here"]
    for g, (a, b) in enumerate(zip(saved["groups"], current["groups"])):
        pa = [(p["name"], p["shape"]) for p in a["params"]]
        pb = [(p["name"], p["shape"]) for p in b["params"]]
        if pa == pb:
            continue
        if len(pa) != len(pb):
            diffs.append(f"group {g}: {len(pa)} parameters in the checkpoint vs {len(pb)} here")
        for i, (x, y) in enumerate(zip(pa, pb)):
            if x != y:
                diffs.append(f"group {g} position {i}: checkpoint {x[0]} {tuple(x[1])} vs model {y[0]} {tuple(y[1])}")
                break
    return diffs


class ZeroCheckpointLayout:
    """Save every rank's partition; load and re-partition to this run's data-parallel size."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # -- save ------------------------------------------------------------------------------------
    def save(self, engine, save_dir, tag: str, client_state: dict):
        opt = engine.optimizer
        part_tensors, opt_meta = _partition_tensors(opt)
        client_tensors, client_meta = split_client_state(client_state)
        meta = {
            **engine_meta(engine, client_meta),
            "zero": {"stage": opt.stage, **opt.parts.describe(), "param_groups": opt_meta["param_groups"]},
        }
        rng_tensors, rng_meta = rng_state()
        state = engine.module.state_dict()
        sharded = sharded_names(engine.module)
        files = {"model": {k: v for k, v in state.items() if k not in sharded}, "client": client_tensors}
        per_rank = {"files": {"rng": rng_tensors, "zero": part_tensors},
                    "meta": {**rng_meta, SCALARS_KEY: opt_meta["scalars"],
                             TAGGED_KEY: [g.describe() for _, g in _tagged(opt.parts)]}}
        if sharded:
            per_rank["files"]["model"] = {k: state[k] for k in sharded}
        return save_tree(save_dir, tag, {"files": files, "meta": meta}, per_rank, engine.global_rank)

    # -- load ------------------------------------------------------------------------------------
    def _check(self, path: Path, meta: dict, opt, data_ranks: list[int]) -> None:
        zero = meta.get("zero")
        if zero is None:
            raise CheckpointError(f"{path} was saved without ZeRO partitions (stage 0); load it with "
                                  f"load_optimizer_states=False to take the model weights only, or load it "
                                  f"in a run without zero_optimization")
        diffs = layout_differences(_data_only(zero), _data_only(opt.parts.describe()))
        if diffs:
            raise CheckpointError(f"checkpoint {path}: its ZeRO partition layout does not match this model's "
                                  f"parameter groups:\n  " + "\n  ".join(diffs[:10]) +
                                  "\n  load it with the same model and the same parameter groups (nothing "
                                  "was changed)")
        for r in data_ranks:
            file = path / f"zero_rank{r}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: the checkpoint was saved by {zero['world_size']} "
                                      f"ranks and every rank's partition is needed to re-partition it")
            with safe_open(str(file), framework="pt") as f:
                for g, spec in enumerate(zero["groups"]):
                    if "axis" in spec:
                        continue  # tagged groups are checked against this rank's own layout
                    shape = f.get_slice(f"master.{g}").get_shape()
                    if list(shape) != [spec["partition_numel"]]:
                        raise CheckpointError(f"{file}: master.{g} has shape {shape}, the layout says "
                                              f"[{spec['partition_numel']}]; the checkpoint is damaged")

    def _repartition(self, path: Path, zero: dict, opt, tagged_ranks: dict[int, list[int]] | None,
                     data_ranks: list[int]
                     ) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
        """This rank's new master slices and elementwise optimizer state, read from the saved partitions.

        Data-axis groups are re-sliced from every saved rank; a tagged group ``g`` is read from the
        saved ranks ``tagged_ranks[g]`` of its own axis group (same layout only), or skipped.
        """
        opened: dict[int, object] = {}

        def handle(r: int):
            if r not in opened:
                opened[r] = safe_open(str(path / f"zero_rank{r}.safetensors"), framework="pt")
            return opened[r]

        keys = list(handle(0).keys())
        masters, state = {}, {}
        for g, group in enumerate(opt.parts.groups):
            if group.axis == "data" and group.shard is None:
                spec = zero["groups"][g]
                ranks = data_ranks
                saved_part, numel = spec["partition_numel"], spec["numel"]
            elif tagged_ranks and g in tagged_ranks:
                ranks, saved_part, numel = tagged_ranks[g], group.partition_numel, group.numel
            else:
                continue
            handles = [handle(r) for r in ranks]
            world = len(ranks)
            lo, hi = group.lo, group.hi

            def piece(key: str, lo=lo, hi=hi, saved_part=saved_part, numel=numel, handles=handles,
                      world=world) -> torch.Tensor:
                out = torch.zeros(hi - lo, dtype=handles[0].get_slice(key)[0:1].dtype)
                for r in range(world):
                    a, b = max(lo, r * saved_part), min(hi, (r + 1) * saved_part, numel)
                    if a < b:
                        out[a - lo:b - lo] = handles[r].get_slice(key)[a - r * saved_part:b - r * saved_part]
                return out

            masters[g] = piece(f"master.{g}")
            entry = {}
            for key in keys:
                if not key.startswith(f"optim.{g}."):
                    continue
                name = key.split(".", 2)[2]
                shape = handles[0].get_slice(key).get_shape()
                entry[name] = piece(key) if list(shape) == [saved_part] else handles[0].get_tensor(key)
            state[g] = entry
        return masters, state

    def load(self, engine, load_dir, tag, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        path = resolve_tag(load_dir, tag)
        meta, files, (rng_tensors, rng_meta) = load_tree(path, engine.global_rank)
        saved = dict(files["model"])
        other_ranks: set[str] = set()
        for shard_file in sorted(path.glob("model_rank*.safetensors")):
            with safe_open(str(shard_file), framework="pt") as f:
                shard = {k: f.get_tensor(k) for k in f.keys()}
            other_ranks |= set(shard)
            saved.update(shard)
        check_model_tensors(engine.module, saved, path, other_ranks)
        own = engine.module.state_dict()
        opt = engine.optimizer
        tagged = _tagged(opt.parts)
        tagged_ranks = None
        if tagged:
            same = (meta["world_size"] == engine.world_size and engine.topology is not None
                    and rng_meta.get(TAGGED_KEY) == [g.describe() for _, g in tagged])
            if same:
                tagged_ranks = {i: engine.topology.ranks_along(g.axis, engine.global_rank) for i, g in tagged}
            elif load_optimizer_states:
                raise CheckpointError(f"{path}: partitions of tagged (expert) parameters were saved under another "
                                      f"layout ({meta['world_size']} ranks) than this run's ({engine.world_size} "
                                      f"ranks); their optimizer state cannot follow: pass "
                                      f"load_optimizer_states=False to load the weights only")
        zero = meta.get("zero")
        data_ranks = saved_data_ranks(meta, engine) if zero is not None else []
        if zero is not None or load_optimizer_states:
            self._check(path, meta, opt, data_ranks)
        if zero is not None and load_optimizer_states and len(zero["param_groups"]) != len(opt.param_groups):
            raise CheckpointError(f"{path}: optimizer has {len(zero['param_groups'])} parameter groups, this "
                                  f"run has {len(opt.param_groups)}; pass load_optimizer_states=False")
        if zero is not None and zero["world_size"] != opt.parts.world:
            warnings.warn(f"{path} was saved by {zero['world_size']} data-parallel ranks and is loaded by "
                          f"{opt.parts.world}: partitions are re-sliced exactly, per-rank random-number "
                          f"streams restart from the saved ranks'", stacklevel=3)
        # every check passed: from here on state changes
        masters, state = (self._repartition(path, zero, opt, tagged_ranks, data_ranks) if zero is not None
                          else (None, None))
        with torch.no_grad():
            engine.module.load_state_dict({k: v for k, v in saved.items() if k in own})
            opt.reload_masters_from_model()
            if masters is not None and self.cfg.load_from_fp32_weights:
                for g, new in masters.items():
                    opt.masters[g].copy_(new)
        if load_optimizer_states and state is not None:
            scalars = rng_meta.get(SCALARS_KEY, {})
            for idx, entry in scalars.items():
                state.setdefault(int(idx), {}).update(entry)
            opt.optimizer.load_state_dict({"state": state, "param_groups": zero["param_groups"]})
        restore_engine_state(engine, meta, load_optimizer_states and state is not None,
                             load_lr_scheduler_states)
        set_rng_state(rng_tensors, {k: v for k, v in rng_meta.items() if k != SCALARS_KEY})
        client = dict(meta["client_state"])
        client.update(files.get("client", {}))
        return str(path), client


def build(engine):
    """``checkpoint_layout`` factory: None at stage 0 (the engine's replicated layout)."""
    cfg = engine.config.section("zero_optimization")
    if cfg is None or cfg.stage == 0:
        return None
    if cfg.stage == 3:
        from .checkpoint3 import Stage3CheckpointLayout

        return Stage3CheckpointLayout(cfg)
    return ZeroCheckpointLayout(cfg)

