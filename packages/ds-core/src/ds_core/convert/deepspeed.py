"""DeepSpeed checkpoint directory -> ds checkpoint.

A DeepSpeed checkpoint (``save_dir/latest`` naming ``save_dir/global_stepN/``) holds, per tag:

- ``mp_rank_00_model_states.pt`` (stages 0-2) or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (stage
  3, one per rank): the module state dict (stage 3: empty placeholders for partitioned parameters),
  ``param_shapes`` (per optimizer group, the trainable parameters' names and shapes in flattening
  order), ``shared_params``, frozen parameters, counters, the scheduler's state, the config, and the
  client state merged in at the top level; stage 0 also keeps the optimizer's state dict there;
- ``zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (stages 1-3) or ``bf16_zero_pp_rank_{r}_...`` (the bf16
  optimizer): rank r's fp32 master partitions and its optimizer state over them, plus the loss scaler.

Stages 1-2 flatten each group and cut the flat buffer into equal rank partitions (padding at the end);
stage 3 cuts every parameter into ``ceil(numel / world)`` pieces and concatenates each rank's pieces
(in sub-groups of one or more parameter groups). :func:`read_deepspeed` undoes either into full,
unpadded fp32 tensors per group (:class:`DeepSpeedState`, which does not depend on the saving world
size), and :func:`write_ds` lays them out as ds's strategy of the same stage would have saved them —
``zero_rank{r}.safetensors`` partitions (stages 1-3) or ``optimizer.safetensors`` (stage 0) — at the
requested data-parallel size, through ds's atomic checkpoint protocol. ds's loaders re-partition to
any other world size from there.

Every file is read by :func:`~ds_core.convert.unpickler.load_restricted`: no DeepSpeed import, no code
from the file runs. DeepSpeed keeps no random-number state; the converted checkpoint's is that of
``torch.manual_seed(seed)`` (the config's ``seed``, else 1234) on every rank.
"""

from __future__ import annotations

import json
import math
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine import checkpoint as protocol
from ..engine.checkpoint_files import CheckpointError
from ..engine.checkpoint_layout import StateWriter, split_client_state
from .unpickler import InertObject, load_restricted

__all__ = ["DeepSpeedState", "Group", "read_deepspeed", "write_ds", "convert_deepspeed"]

#: keys DeepSpeed writes into ``*_model_states.pt`` itself; anything else there is the client state.
_ENGINE_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                "checkpoint_parallel_dimensions", "ds_config", "ds_version", "mp_rank"}
_LAYOUTS = {0: "replicated", 1: "zero", 2: "zero", 3: "zero-3"}
_NAMES = {0: "data parallel (stage 0)", 1: "ZeRO stage 1", 2: "ZeRO stage 2", 3: "ZeRO stage 3"}


@dataclass
class Group:
    """One optimizer parameter group, whole: fp32 masters and elementwise state flattened in the order of
    ``names`` (unpadded), scalar state (``step``) and the group's hyperparameters."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    master: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, Any] = field(default_factory=dict)

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (group order) cut into one flat tensor per parameter."""
        return list(torch.split(flat, self.numels))


@dataclass
class DeepSpeedState:
    """A DeepSpeed checkpoint read into world-size-independent form (see the module docstring)."""

    path: Path
    stage: int
    world_size: int
    precision: str
    groups: list[Group]
    module: dict[str, torch.Tensor]  #: module state that is not a trainable parameter (buffers, frozen)
    module_dtype: dict[str, torch.dtype]  #: the saved dtype of every module key
    shared: dict[str, str]  #: tied parameter name -> the name it shares storage with
    global_steps: int = 0
    global_samples: int = 0
    skipped_steps: int = 0
    lr_scheduler: dict | None = None
    loss_scaler: dict | None = None
    config: dict = field(default_factory=dict)
    client_state: dict = field(default_factory=dict)
    ds_version: str = "?"

    def module_state(self) -> dict[str, torch.Tensor]:
        """The full module state dict in the saved dtypes (trainable parameters from the fp32 masters)."""
        out = dict(self.module)
        for g in self.groups:
            for name, piece, shape in zip(g.names, g.pieces(g.master), g.shapes):
                out[name] = piece.reshape(shape).to(self.module_dtype.get(name, torch.float32))
        for name, source in self.shared.items():
            if source in out and name in self.module_dtype:
                out[name] = out[source]
        return out


# -- reading ---------------------------------------------------------------------------------------

def _tag_dir(ckpt_dir: Path, tag: str | None) -> Path:
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory; pass a DeepSpeed save_dir (holding 'latest') or "
                              f"one of its tag directories")
    if tag is not None:
        path = ckpt_dir / tag
    elif list(ckpt_dir.glob("*model_states.pt")):
        path = ckpt_dir
    elif (ckpt_dir / "latest").is_file():
        path = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    else:
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
        raise CheckpointError(f"{ckpt_dir} has no 'latest' file and no *_model_states.pt: pass --tag, one of "
                              f"{tags[:10] or '(no directories)'}")
    if not path.is_dir():
        raise CheckpointError(f"tag directory {path} does not exist; pass an existing tag")
    return path


def _files(path: Path, pattern: str) -> list[Path]:
    """Files ``pattern`` (one ``{r}``) in rank order, checked to be ranks 0..n-1."""
    regex = re.compile(re.escape(pattern).replace(r"\{r\}", r"(\d+)") + "$")
    found = {}
    for f in path.iterdir():
        m = regex.match(f.name)
        if m:
            found[int(m.group(1))] = f
    if found and sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise CheckpointError(f"{path}: {pattern.format(r=missing[0])} is missing; every rank's file is needed")
    return [found[r] for r in range(len(found))]


def _refuse_parallel_layouts(path: Path) -> None:
    names = [f.name for f in path.iterdir()]
    if any(re.match(r"(zero_pp_rank_\d+_)?mp_rank_(0[1-9]|[1-9]\d*)_model_states\.pt$", n) for n in names):
        raise CheckpointError(f"{path} holds tensor-parallel (mp_rank > 0) model states: converting model-parallel "
                              f"DeepSpeed checkpoints is not supported; consolidate them with DeepSpeed first")
    if any(n.startswith("layer_") for n in names):
        raise CheckpointError(f"{path} is a pipeline-parallel (PipelineModule) checkpoint (layer_*.pt files): "
                              f"converting those is not supported; consolidate it with DeepSpeed first")


def _precision(config: dict) -> str:
    if (config.get("bf16") or config.get("bfloat16") or {}).get("enabled") is True:
        return "bf16"
    if (config.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def _scaler(obj: Any, precision: str) -> dict | None:
    """DeepSpeed's loss scaler (an inert stand-in) as ds's ``LossScaler.state_dict()``."""
    if precision != "fp16" or not isinstance(obj, InertObject):
        return None
    return {"scale": float(obj.get("cur_scale", 1.0)),
            "remaining_hysteresis": int(obj.get("cur_hysteresis", obj.get("delayed_shift", 1))),
            "iteration": int(obj.get("cur_iter", 0)), "last_overflow": int(obj.get("last_overflow_iter", -1))}


def _hyper(group: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}


def _stage_of(optim: dict | None, config: dict) -> int:
    if optim is not None and "zero_stage" in optim:
        stage = optim["zero_stage"]
        return int(stage.value if isinstance(stage, InertObject) else stage)
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _cat_partitions(parts: list[torch.Tensor], numel: int, what: str, path: Path) -> torch.Tensor:
    flat = torch.cat([p.detach().reshape(-1).float() if p.is_floating_point() else p.reshape(-1) for p in parts])
    if flat.numel() < numel:
        raise CheckpointError(f"{path}: {what} holds {flat.numel()} elements across ranks, the parameters "
                              f"need {numel}; the checkpoint is incomplete")
    return flat[:numel].clone()


def _group_state(states: list[dict], part_numel: int, numel: int, path: Path, g: int) -> dict[str, Any]:
    """One group's optimizer state from every rank's partition state (elementwise keys concatenated)."""
    out: dict[str, Any] = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == part_numel:
            out[key] = _cat_partitions([s[key] for s in states], numel, f"optimizer state {key!r} of group {g}",
                                       path)
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _read_partitioned(path: Path, optims: list[dict], param_shapes: list[dict]) -> list[Group]:
    """Stages 1-2 (and the bf16 optimizer): each group flat, cut into equal rank partitions."""
    groups = []
    for g, shapes in enumerate(param_shapes):
        names, dims = list(shapes), [tuple(s) for s in shapes.values()]
        numel = sum(math.prod(s) for s in dims)
        parts = [o["single_partition_of_fp32_groups"][g] for o in optims]
        master = _cat_partitions(parts, numel, f"fp32 partitions of group {g}", path)
        bases = [o["base_optimizer_state"] for o in optims]
        if isinstance(bases[0], dict) and "state" in bases[0]:
            states = [b["state"].get(g, {}) for b in bases]
            hyper = _hyper(bases[0]["param_groups"][g])
        else:  # elastic layout: a list of per-group states
            states = [b[g] for b in bases]
            hyper = {}
        state = _group_state(states, parts[0].numel(), numel, path, g)
        groups.append(Group(names, dims, master, state, hyper))
    return groups


def _read_stage3(path: Path, optims: list[dict], param_shapes: list[dict]) -> list[Group]:
    """Stage 3: every parameter cut in ``ceil(numel / world)`` pieces; a rank's pieces end to end over all
    its sub-groups (which follow the parameter groups in order)."""
    world = len(optims)
    inners = [o["optimizer_state_dict"] for o in optims]
    flats = [torch.cat([t.detach().reshape(-1).float() for t in o["fp32_flat_groups"]]) for o in optims]
    n_sub = len(optims[0]["fp32_flat_groups"])
    sub_numel = [t.numel() for t in optims[0]["fp32_flat_groups"]]
    elementwise: dict[str, list[torch.Tensor]] = {}
    keys = {k for i in range(n_sub) for k, v in inners[0]["state"].get(i, {}).items()
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == sub_numel[i]}
    for key in sorted(keys):
        elementwise[key] = [torch.cat([inner["state"][i][key].reshape(-1) for i in range(n_sub)]) for inner in inners]
    groups, offset = [], 0
    for g, shapes in enumerate(param_shapes):
        names, dims = list(shapes), [tuple(s) for s in shapes.values()]
        masters, states = [], {k: [] for k in elementwise}
        for dim in dims:
            numel = math.prod(dim)
            part = math.ceil(numel / world)
            if offset + part > flats[0].numel():
                raise CheckpointError(f"{path}: the fp32 shards end before parameter {names[len(masters)]} of group "
                                      f"{g}; the checkpoint does not match its param_shapes")
            masters.append(torch.cat([f[offset:offset + part] for f in flats])[:numel])
            for key, per_rank in elementwise.items():
                states[key].append(torch.cat([t[offset:offset + part] for t in per_rank])[:numel].float())
            offset += part
        inner_group = inners[0]["param_groups"][g] if g < len(inners[0]["param_groups"]) else {}
        first = (inner_group.get("params") or [g])[0]
        state = {k: torch.cat(v) if v else torch.zeros(0) for k, v in states.items()}
        for key, value in inners[0]["state"].get(first, {}).items():
            if key not in state:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        master = torch.cat(masters) if masters else torch.zeros(0)
        groups.append(Group(names, dims, master, state, _hyper(inner_group)))
    return groups


def _stage0_shapes(path: Path, model: dict) -> list[dict]:
    """Stage 0 saves no ``param_shapes``: the optimizer's parameters are the module's non-buffer entries in
    order (``model.parameters()``), split by the sizes of its parameter groups."""
    opt = model.get("optimizer")
    if not isinstance(opt, dict) or "param_groups" not in opt:
        return []
    buffers = set(model.get("buffer_names") or [])
    names = [k for k in model["module"] if k not in buffers]
    sizes = [len(g["params"]) for g in opt["param_groups"]]
    if sum(sizes) != len(names):
        raise CheckpointError(f"{path}: the optimizer holds {sum(sizes)} parameters but the module has {len(names)} "
                              f"non-buffer entries (frozen or tied parameters): a stage-0 checkpoint does not say "
                              f"which is which; convert a checkpoint saved with ZeRO stage 1 or higher")
    out, at = [], 0
    for size in sizes:
        out.append({n: tuple(model["module"][n].shape) for n in names[at:at + size]})
        at += size
    return out


def _read_stage0(path: Path, model: dict, param_shapes: list[dict]) -> list[Group]:
    """Stage 0: the torch optimizer's own state dict, per parameter, in ``model_states['optimizer']``."""
    opt = model.get("optimizer")
    if not isinstance(opt, dict) or "state" not in opt or "param_groups" not in opt:
        keys = sorted(opt) if isinstance(opt, dict) else type(opt).__name__
        raise CheckpointError(f"{path}: the stage-0 optimizer state ({keys}) is not a torch optimizer's state dict "
                              f"(a 16-bit stage-0 run keeps DeepSpeed's FP16 optimizer there, which is not "
                              f"supported); convert a checkpoint saved with ZeRO stage 1 or higher")
    module = model["module"]
    groups = []
    for g, shapes in enumerate(param_shapes):
        names, dims = list(shapes), [tuple(s) for s in shapes.values()]
        indices = opt["param_groups"][g]["params"]
        master = torch.cat([module[n].detach().reshape(-1).float() for n in names]) if names else torch.zeros(0)
        per_param = [opt["state"].get(i, {}) for i in indices]
        state: dict[str, Any] = {}
        for key, value in (per_param[0] if per_param else {}).items():
            if isinstance(value, torch.Tensor) and value.shape == torch.Size(dims[0]) and value.dim() > 0:
                state[key] = torch.cat([s[key].reshape(-1).float() for s in per_param])
            else:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        groups.append(Group(names, dims, master, state, _hyper(opt["param_groups"][g])))
    return groups


def read_deepspeed(ckpt_dir: str | Path, tag: str | None = None) -> DeepSpeedState:
    """Read a DeepSpeed checkpoint (``save_dir`` with ``latest``, or one tag directory) into memory."""
    path = _tag_dir(Path(ckpt_dir), tag)
    _refuse_parallel_layouts(path)
    model_files = _files(path, "zero_pp_rank_{r}_mp_rank_00_model_states.pt") or \
        [f for f in [path / "mp_rank_00_model_states.pt"] if f.is_file()]
    if not model_files:
        raise CheckpointError(f"{path} holds no DeepSpeed model states (mp_rank_00_model_states.pt or "
                              f"zero_pp_rank_*_mp_rank_00_model_states.pt); pass a DeepSpeed checkpoint directory")
    optim_files = (_files(path, "zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
                   or _files(path, "bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    model = load_restricted(model_files[0])
    config = dict(model.get("ds_config") or {})
    optims = [load_restricted(f)["optimizer_state_dict"] for f in optim_files]
    stage = _stage_of(optims[0] if optims else None, config)
    param_shapes = model.get("param_shapes")
    if not param_shapes and not optims:
        param_shapes = _stage0_shapes(model_files[0], model)
    if not param_shapes:
        raise CheckpointError(f"{model_files[0]} has no param_shapes: it was written by a DeepSpeed too old (or "
                              f"without an optimizer) to convert")
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    precision = _precision(config)
    if optims and "single_partition_of_fp32_groups" in optims[0]:
        groups = _read_partitioned(path, optims, param_shapes)
    elif optims and "fp32_flat_groups" in optims[0]:
        groups = _read_stage3(path, optims, param_shapes)
    elif optims:
        raise CheckpointError(f"{optim_files[0]}: optimizer state with keys {sorted(optims[0])} is not a layout "
                              f"this converter knows (ZeRO 1-3 partitions or the bf16 optimizer's)")
    else:
        groups = _read_stage0(path, model, param_shapes)
    world = len(optims) if optims else int(model.get("dp_world_size", 1))
    trainable = {n for g in groups for n in g.names}
    shared = {k: v for k, v in (model.get("shared_params") or {}).items() if isinstance(v, str)}
    saved_module = model["module"]
    module = {k: v.detach().clone() for k, v in saved_module.items() if k not in trainable and k not in shared}
    dtypes = {k: v.dtype for k, v in saved_module.items()}
    if stage == 3:  # frozen parameters: each rank keeps a fragment
        frozen = model.get("frozen_param_shapes") or {}
        if frozen:
            ranks = [model] + [load_restricted(f) for f in model_files[1:]]
            for name, shape in frozen.items():
                numel = math.prod(shape)
                module[name] = _cat_partitions([r["frozen_param_fragments"][name] for r in ranks], numel,
                                               f"frozen parameter {name}", path).reshape(tuple(shape)).to(dtypes[name])
    optim0 = optims[0] if optims else {}
    client = {k: v for k, v in model.items() if k not in _ENGINE_KEYS}
    return DeepSpeedState(
        path=path, stage=stage, world_size=world, precision=precision, groups=groups, module=module,
        module_dtype=dtypes, shared=shared, global_steps=int(model.get("global_steps", 0)),
        global_samples=int(model.get("global_samples", 0)), skipped_steps=int(model.get("skipped_steps", 0)),
        lr_scheduler=model.get("lr_scheduler"), loss_scaler=_scaler(optim0.get("loss_scaler"), precision),
        config=config, client_state=client, ds_version=str(model.get("ds_version", "?")))


# -- writing -----------------------------------------------------------------------------------------

def _padded(numel: int, world: int) -> int:
    """ds's partition padding: a multiple of ``world``, at least ``world`` (ds_zero.partition.padded_numel)."""
    return max(world, -(-numel // world) * world)


def _zero_files(state: DeepSpeedState, world: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Stages 1-2: per rank ``master.{g}`` / ``optim.{g}.{key}`` partitions and the layout JSON.

    [Note: ds flattens a group in reverse order] ds_zero's GroupPartition lays parameters out last
    first (the order backward produces gradients); DeepSpeed lays them out first first.
    """
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    layout = []
    for g, group in enumerate(state.groups):
        order = list(reversed(range(len(group.names))))
        numel = sum(group.numels)
        padded = _padded(numel, world)
        part = padded // world

        def relaid(flat: torch.Tensor, order=order, group=group, padded=padded) -> torch.Tensor:
            pieces = group.pieces(flat)
            out = torch.zeros(padded, dtype=flat.dtype)
            if pieces:
                body = torch.cat([pieces[i] for i in order])
                out[:body.numel()] = body
            return out

        flats = {"master": relaid(group.master)}
        for key, value in group.state.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == numel and numel > 0:
                flats[f"optim.{g}.{key}"] = relaid(value)
        for r in range(world):
            for key, flat in flats.items():
                name = f"master.{g}" if key == "master" else key
                ranks[r][name] = flat[r * part:(r + 1) * part].clone()
            for key, value in group.state.items():
                if f"optim.{g}.{key}" not in flats and isinstance(value, torch.Tensor):
                    ranks[r][f"optim.{g}.{key}"] = value.clone()
        offsets, total = [], 0
        for i in order:
            offsets.append(total)
            total += group.numels[i]
        layout.append({"numel": numel, "padded": padded, "partition_numel": part,
                       "params": [{"name": group.names[i], "shape": list(group.shapes[i]), "offset": o}
                                  for i, o in zip(order, offsets)]})
    return ranks, {"world_size": world, "groups": layout}


def _zero3_files(state: DeepSpeedState, world: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Stage 3: per rank, each parameter's ``[r·part, (r+1)·part)`` piece end to end (ds_zero.stage3)."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    layout = []
    for g, group in enumerate(state.groups):
        parts = [_padded(n, world) // world for n in group.numels]
        offsets = [sum(parts[:i]) for i in range(len(parts))]
        partition_numel = max(1, sum(parts))

        def sharded(flat: torch.Tensor, r: int, group=group, parts=parts, partition_numel=partition_numel):
            out = torch.zeros(partition_numel, dtype=flat.dtype)
            at = 0
            for piece, part in zip(group.pieces(flat), parts):
                mine = piece[r * part:(r + 1) * part]
                out[at:at + mine.numel()] = mine
                at += part
            return out

        numel = sum(group.numels)
        for r in range(world):
            ranks[r][f"master.{g}"] = sharded(group.master, r)
            for key, value in group.state.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == numel and numel > 0:
                    ranks[r][f"optim.{g}.{key}"] = sharded(value, r)
                elif isinstance(value, torch.Tensor):
                    ranks[r][f"optim.{g}.{key}"] = value.clone()
        layout.append({"layout": "per_parameter", "numel": numel, "partition_numel": partition_numel,
                       "padded": partition_numel * world,
                       "params": [{"name": n, "shape": list(s), "offset": o, "part": p}
                                  for n, s, o, p in zip(group.names, group.shapes, offsets, parts)]})
    return ranks, {"world_size": world, "layout": "per_parameter", "groups": layout}


def _scalars(state: DeepSpeedState) -> dict[str, dict]:
    return {str(g): {k: v for k, v in group.state.items() if not isinstance(v, torch.Tensor)}
            for g, group in enumerate(state.groups)
            if any(not isinstance(v, torch.Tensor) for v in group.state.values())}


def _param_groups(state: DeepSpeedState, per_param: bool) -> list[dict]:
    out, index = [], 0
    for g, group in enumerate(state.groups):
        if per_param:
            params = list(range(index, index + len(group.names)))
            index += len(group.names)
        else:
            params = [g]
        out.append({**group.hyper, "params": params})
    return out


def _replicated_files(state: DeepSpeedState) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """Stage 0: the torch optimizer's per-parameter state (``state.{i}.{key}``) and, for 16-bit runs, the
    fp32 master buffer (parameters in reverse registration order, ds_core.engine.precision.FlatGradients)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    index = 0
    for group in state.groups:
        numel = sum(group.numels)
        for i, shape in enumerate(group.shapes):
            for key, value in group.state.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == numel and numel > 0:
                    tensors[f"state.{index}.{key}"] = group.pieces(value)[i].reshape(shape).clone()
                elif isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{key}"] = value.clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
            index += 1
    master = None
    if state.precision != "fp32":
        pieces = [p for group in state.groups for p in group.pieces(group.master)]
        master = {"flat": torch.cat(list(reversed(pieces))) if pieces else torch.zeros(0)}
    return tensors, {"param_groups": _param_groups(state, per_param=True), "scalars": scalars}, master


def _seeded_rng(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    saved_torch, saved_py = torch.get_rng_state(), random.getstate()
    try:
        np = __import__("numpy")
        saved_np = np.random.get_state()
    except ImportError:
        np = saved_np = None
    try:
        torch.manual_seed(seed)
        random.seed(seed)
        if np is not None:
            np.random.seed(seed)
        return protocol.rng_state()
    finally:
        torch.set_rng_state(saved_torch)
        random.setstate(saved_py)
        if np is not None:
            np.random.set_state(saved_np)


@contextmanager
def _one_process():
    """[Note: conversion is local] One process writes every rank's files, so the directory protocol's
    agreement between ranks must not run even when this process belongs to a process group (a rank-0-only
    conversion inside a training job): its view of the world is narrowed to this process while writing."""
    original = protocol._world
    protocol._world = lambda: (0, 1)
    try:
        yield
    finally:
        protocol._world = original


def write_ds(state: DeepSpeedState, out_dir: str | Path, tag: str | None = None, world_size: int | None = None,
             stage: int | None = None, set_latest: bool = True) -> Path:
    """Write ``state`` as the checkpoint ds's strategy for ``stage`` (default: the DeepSpeed run's) would
    save at ``world_size`` data-parallel ranks (default: the DeepSpeed run's); returns its directory."""
    stage = state.stage if stage is None else int(stage)
    world = state.world_size if world_size is None else int(world_size)
    if stage not in _LAYOUTS:
        raise CheckpointError(f"stage {stage} is not a ZeRO stage; pass 0, 1, 2 or 3")
    if world < 1:
        raise CheckpointError(f"world_size {world} must be at least 1")
    tag = protocol.check_tag(tag or f"global_step{state.global_steps}")
    client_tensors, client_meta = split_client_state(state.client_state)
    full = state.module_state()
    writers = [StateWriter(r, "", r) for r in range(world)]
    zero_meta: dict[str, Any]
    if stage == 0:
        tensors, opt_meta, master = _replicated_files(state)
        writers[0].replicated("optimizer", tensors)
        writers[0].meta["optimizer"] = opt_meta
        if master is not None:
            writers[0].replicated("master", master)
        writers[0].replicated("model", full)
    else:
        ranks, layout = (_zero3_files if stage == 3 else _zero_files)(state, world)
        zero_meta = {"stage": stage, **layout, "param_groups": _param_groups(state, per_param=False)}
        if stage == 3:
            trainable = {n for g in state.groups for n in g.names}
            zero_meta["aliases"] = dict(state.shared)
            full = {k: v for k, v in full.items() if k not in trainable and k not in state.shared}
        scalars = _scalars(state)
        for r, w in enumerate(writers):
            w.per_rank("zero", ranks[r])
            w.rank_meta["zero_optimizer_scalars"] = scalars
            w.rank_meta["zero_tagged_groups"] = []
        writers[0].meta["zero"] = zero_meta
        writers[0].replicated("model", {k: v.contiguous() for k, v in full.items()})
    writers[0].meta["sharded"] = []
    writers[0].meta["strategy"] = {"layout": _LAYOUTS[stage], "name": _NAMES[stage], "data_world_size": world}
    gas = state.config.get("gradient_accumulation_steps", 1)
    gas = gas if isinstance(gas, int) and gas > 0 else 1  # "auto" or absent: one micro step per step
    meta = {"config": json.loads(json.dumps(state.config, default=str)), "global_steps": state.global_steps,
            "global_samples": state.global_samples, "micro_steps": state.global_steps * gas, "world_size": world,
            "dp_world_size": world, "precision": state.precision, "skipped_steps": state.skipped_steps,
            "lr_scheduler": state.lr_scheduler, "loss_scaler": state.loss_scaler, "client_state": client_meta,
            "converted_from": {"framework": "deepspeed", "version": state.ds_version, "path": str(state.path),
                               "stage": state.stage, "world_size": state.world_size}}
    seed = state.config.get("seed", 1234)
    rng = _seeded_rng(int(seed) if isinstance(seed, int) else 1234)
    with _one_process(), protocol.writing_checkpoint(out_dir, tag, 0) as partial:
        for r, w in enumerate(writers):
            w.write(partial, meta if r == 0 else None, rng, client_tensors if r == 0 else None)
    return Path(out_dir) / tag


def convert_deepspeed(ckpt_dir: str | Path, out_dir: str | Path, tag: str | None = None,
                      out_tag: str | None = None, world_size: int | None = None, stage: int | None = None) -> Path:
    """Convert the DeepSpeed checkpoint in ``ckpt_dir`` (its ``latest`` tag, or ``tag``) into a ds checkpoint
    in ``out_dir`` (tag ``out_tag``, default the DeepSpeed tag's ``global_step{N}``); ``load_checkpoint(out_dir)``
    resumes it at any world size. Returns the written tag directory."""
    state = read_deepspeed(ckpt_dir, tag)
    return write_ds(state, out_dir, out_tag or state.path.name, world_size, stage)
