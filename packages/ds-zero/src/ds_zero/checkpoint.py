"""ZeRO stage 1-2 checkpoint state: partitions per rank, re-partitioned on load.

The ZeRO strategies' ``save``/``load`` (``strategy.py``): the engine writes the module files and its
own JSON and runs ds-core's atomic directory protocol (``ds_core.engine.checkpoint_layout``); this
module adds the partitions. Inside ``save_dir/tag/``:

- ``model.safetensors`` (rank 0): the full module state (parameters are replicated after each step);
- ``zero_rank{r}.safetensors`` (every rank): ``master.{g}`` — rank r's fp32 master partition of
  group g — and ``optim.{g}.{key}`` — its optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``...);
- ``meta.json``: counters, scheduler, loss scaler, client state, and ``zero``: the layout (stage,
  world size, and per group its numel, padded numel, partition numel and the name, shape and flat
  offset of every parameter), plus the optimizer's param groups;
- ``rng_rank{r}.*``: RNG states, and rank r's non-tensor optimizer state.

Loading compares that layout with the model first and raises :class:`CheckpointError` listing the
differences before anything changes. With optimizer state, the masters come from the partitions and
must agree with ``model.safetensors`` (the model's dtype of each master, bit for bit): a checkpoint
whose files disagree would have every rank step from different weights, so it is refused. Because the unpadded flat order of a group does not depend on
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

import torch
from safetensors import safe_open

from ds_core.engine.checkpoint import CheckpointError
from ds_core.engine.step import agree_any

__all__ = ["save_partitions", "load_partitions", "layout_differences", "partition_tensors"]

SCALARS_KEY = "zero_optimizer_scalars"
TAGGED_KEY = "zero_tagged_groups"


def _tagged(parts) -> list[tuple[int, object]]:
    """(index, group) of the groups partitioned over another axis than data."""
    return [(i, g) for i, g in enumerate(parts.groups) if g.axis != "data"]


def _data_only(layout: dict) -> dict:
    return {**layout, "groups": [g for g in layout["groups"] if "axis" not in g]}


def partition_tensors(opt) -> tuple[dict[str, torch.Tensor], dict]:
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


def save_partitions(strategy, writer) -> None:
    """Add this rank's master and optimizer-state partitions, and the layout, to ``writer``."""
    opt, parts = strategy.zero, strategy.parts
    part_tensors, opt_meta = partition_tensors(opt)
    writer.meta["zero"] = {"stage": strategy.stage, **parts.describe(), "param_groups": opt_meta["param_groups"]}
    writer.per_rank("zero", part_tensors)
    writer.rank_meta[SCALARS_KEY] = opt_meta["scalars"]
    writer.rank_meta[TAGGED_KEY] = [g.describe() for _, g in _tagged(parts)]


def _check(reader, zero: dict, parts) -> None:
    path = reader.path
    diffs = layout_differences(_data_only(zero), _data_only(parts.describe()))
    if diffs:
        raise CheckpointError(f"checkpoint {path}: its ZeRO partition layout does not match this model's "
                              f"parameter groups:\n  " + "\n  ".join(diffs[:10]) +
                              "\n  load it with the same model and the same parameter groups (nothing "
                              "was changed)")
    for r in range(zero["world_size"]):
        file = reader.rank_file("zero", r)
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


def _repartition(reader, zero: dict, parts, tagged_ranks: dict[int, list[int]] | None
                 ) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
    """This rank's new master slices and elementwise optimizer state, read from the saved partitions.

    Data-axis groups are re-sliced from every saved rank; a tagged group ``g`` is read from the
    saved ranks ``tagged_ranks[g]`` of its own axis group (same layout only), or skipped.
    """
    opened: dict[int, object] = {}

    def handle(r: int):
        if r not in opened:
            opened[r] = safe_open(str(reader.rank_file("zero", r)), framework="pt")
        return opened[r]

    keys = list(handle(0).keys())
    masters, state = {}, {}
    for g, group in enumerate(parts.groups):
        if group.axis == "data":
            spec = zero["groups"][g]
            ranks = list(range(zero["world_size"]))
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


def _disagreement(parts, masters: dict[int, torch.Tensor]) -> str | None:
    """Where the loaded model's own partition is not the masters in the model's dtype (None: it is)."""
    for g, master in masters.items():
        group = parts.groups[g]
        own = group.own()
        expected = master.to(device=own.device, dtype=own.dtype)
        if not torch.equal(own, expected):
            bad = (own.float() - expected.float()).abs()
            at = int(bad.argmax())
            names = [group.names[f.index] for f in group.fragments(group.lo + at, group.lo + at + 1)] or ["padding"]
            return (f"parameter {names[0]} differs by up to {float(bad.max()):.3g} between the model file and "
                    f"the fp32 masters")
    return None


def load_partitions(strategy, reader, load_optimizer_states: bool) -> None:
    """Check the saved partitions against this run, load the module, then the masters and state.

    Without optimizer state (or from a checkpoint of another layout) the masters follow the loaded
    model weights; with it they come from the saved fp32 partitions (``load_from_fp32_weights``) and
    must agree with the model file (see the module docstring).
    """
    opt, parts, ctx = strategy.zero, strategy.parts, strategy.ctx
    path, zero = reader.path, reader.meta.get("zero")
    use_files = load_optimizer_states and reader.layout == strategy.layout and zero is not None
    tagged = _tagged(parts)
    tagged_ranks = None
    if use_files and tagged:
        same = (reader.engine_meta["world_size"] == ctx.world_size
                and reader.rank_meta.get(TAGGED_KEY) == [g.describe() for _, g in tagged])
        if not same:
            raise CheckpointError(f"{path}: partitions of tagged (expert) parameters were saved under another "
                                  f"layout ({reader.engine_meta['world_size']} ranks) than this run's "
                                  f"({ctx.world_size} ranks); their optimizer state cannot follow: pass "
                                  f"load_optimizer_states=False to load the weights only")
        tagged_ranks = {i: ctx.topology.ranks_along(g.axis, ctx.rank) for i, g in tagged}
    if use_files:
        _check(reader, zero, parts)
        if len(zero["param_groups"]) != len(opt.param_groups):
            raise CheckpointError(f"{path}: optimizer has {len(zero['param_groups'])} parameter groups, this "
                                  f"run has {len(opt.param_groups)}; pass load_optimizer_states=False")
        if zero["world_size"] != parts.world:
            warnings.warn(f"{path} was saved by {zero['world_size']} data-parallel ranks and is loaded by "
                          f"{parts.world}: partitions are re-sliced exactly, per-rank random-number "
                          f"streams restart from the saved ranks'", stacklevel=4)
    # every check passed: from here on state changes
    reader.load_module()
    masters, state = _repartition(reader, zero, parts, tagged_ranks) if use_files else (None, None)
    with torch.no_grad():
        if masters is not None and strategy.cfg.load_from_fp32_weights:
            problem = _disagreement(parts, masters)
            if agree_any(problem is not None):  # every rank (every stage) refuses together
                raise CheckpointError(
                    f"{path}: model.safetensors and the fp32 masters in zero_rank*.safetensors disagree "
                    f"({problem or 'found on another rank'}); continuing would have ranks step from different "
                    f"weights. Restore the checkpoint's files, or pass load_optimizer_states=False to take the "
                    f"model file's weights (the masters then follow them)")
            opt.reload_masters_from_model()
            for g, new in masters.items():
                opt.masters[g].copy_(new)
        else:
            opt.reload_masters_from_model()
    if state is not None:
        for idx, entry in reader.rank_meta.get(SCALARS_KEY, {}).items():
            state.setdefault(int(idx), {}).update(entry)
        opt.optimizer.load_state_dict({"state": state, "param_groups": zero["param_groups"]})
