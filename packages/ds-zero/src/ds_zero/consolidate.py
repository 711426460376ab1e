"""Consolidate a ZeRO checkpoint (stage 0-3, any world size) into one plain safetensors state dict.

The counterpart of DeepSpeed's ``zero_to_fp32.py``: the fp32 master partitions every rank saved are
stitched back into full parameters, which a plain PyTorch model loads with
``safetensors.torch.load_file`` — no ds, no process group. Nothing is loaded whole: the output
header is computed from the saved layout first, then one tensor at a time is assembled from the
pieces of the rank files that hold it (``safe_open(...).get_slice``) and streamed to the file, so
memory stays at the largest single tensor.

Layouts (see ``checkpoint.py`` and ``checkpoint3.py``):

- stages 1-2: a group's parameters lie end to end in one flat buffer split into equal partitions,
  so a parameter may span several ranks' ``master.{g}``;
- stage 3: each parameter is split on its own; rank r holds its shard at ``offset`` in ``master.{g}``;
- stage 0 (no partitions), and tensors that are not partitioned (buffers, frozen parameters,
  experts): taken from ``model.safetensors`` (``model_rank*.safetensors``) as saved.

Partitioned parameters come out in fp32 (the masters); other tensors keep their saved dtype. Every
name of a tied parameter is written (as separate copies), so the result is an ordinary state dict.
With tensor or sequence parallelism each *scope* (the ranks holding one model shard) has its own
files, prefixed with its coordinates (``tp1_model.safetensors``, ``tp1_zero_rank0.safetensors``,
described in ``tp1_meta.json``): every scope is consolidated, tensors all scopes hold are written once,
and tensor-parallel shards (ds-parallel's self-describing keys) are stitched back into full tensors.
A pipeline checkpoint (``meta.json`` kind ``pipeline``: one file per layer and model shard,
``tp{t}_layer_XX-model_states.safetensors``) is consolidated from its layer files, its tensors named
``{layer index}.{name in the layer}`` (the PipelineModule's names, and an ``nn.Sequential``'s of its layers).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ds_core.engine.checkpoint import CheckpointError, resolve_tag, verify_checkpoint

__all__ = ["zero_to_fp32", "consolidated_tensors", "write_safetensors_streaming",
           "get_fp32_state_dict_from_zero_checkpoint", "load_state_dict_from_zero_checkpoint"]

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}

Producer = Callable[[], torch.Tensor]


def _resolve(checkpoint_dir, tag: str | None) -> Path:
    path = Path(checkpoint_dir)
    if tag is None and (path / "meta.json").is_file():
        verify_checkpoint(path)
        return path
    return resolve_tag(path, tag, collective=False)


def _slice_dtype(sl) -> torch.dtype:
    return _FROM_NAME[sl.get_dtype()]


def consolidated_tensors(checkpoint_dir, tag: str | None = None
                         ) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], Producer]]:
    """``(name, dtype, shape, produce)`` for every tensor of the consolidated state dict, in order.

    ``produce()`` assembles that one tensor on demand (reading only its pieces).
    """
    yield from _stitch_tensor_parallel(_consolidated(checkpoint_dir, tag))


# Tensor-parallel shards are saved under self-describing keys (docs/parallel.md, "shard keys"):
# <full name>#tp:<rank>/<size>:dim<d>:<full shape>:<start>+<length>,...  (or #rep: for replicated rows)
_SHARD_KEY = re.compile(r"^(?P<name>.+)#(?:tp:\d+/\d+|rep):dim(?P<dim>\d+):(?P<shape>\d+(?:x\d+)*)"
                        r":(?P<runs>\d+\+\d+(?:,\d+\+\d+)*)$")


def _stitch_tensor_parallel(entries):
    """Every tensor-parallel shard of one tensor (one per rank file) becomes that full tensor."""
    groups: dict[str, list] = {}
    for name, dtype, shape, produce in entries:
        m = _SHARD_KEY.match(name)
        if m is None:
            yield name, dtype, shape, produce
            continue
        runs = [tuple(int(v) for v in r.split("+")) for r in m["runs"].split(",")]
        full = tuple(int(d) for d in m["shape"].split("x"))
        groups.setdefault(m["name"], []).append((int(m["dim"]), full, runs, dtype, produce))
    for name, pieces in groups.items():
        dim, full, _, dtype, _ = pieces[0]

        def produce(pieces=pieces, dim=dim, full=full, dtype=dtype, name=name):
            out = torch.empty(full, dtype=dtype)
            covered = torch.zeros(full[dim], dtype=torch.bool)
            for _, _, runs, _, piece in pieces:
                local, at = piece(), 0
                for start, length in runs:
                    out.narrow(dim, start, length).copy_(local.narrow(dim, at, length))
                    covered[start:start + length] = True
                    at += length
            if not covered.all():
                raise CheckpointError(f"{name}: the tensor-parallel shards saved hold only {int(covered.sum())} of "
                                      f"its {full[dim]} rows along dim {dim}; every rank's model file is needed")
            return out
        yield name, dtype, full, produce


_SCOPE = re.compile(r"^(?:pp\d+_)?(?:sp\d+_)?(?:tp\d+_)?$")


def _scopes(path: Path, meta: dict) -> list[tuple[str, dict]]:
    """``(prefix, JSON)`` of every scope of the checkpoint: each tensor/sequence rank's files are
    prefixed with its coordinates (``tp1_``) and described in ``{prefix}meta.json``; without such axes
    there is one scope, ``""``, described in ``meta.json``."""
    found = sorted(f.name[:-len("meta.json")] for f in path.glob("*_meta.json") if _SCOPE.match(f.name[:-9]))
    if not found:
        return [("", meta)]
    if any(s.startswith("pp") for s in found):
        raise CheckpointError(f"{path} is a pipeline checkpoint (one file per layer); zero-to-fp32 consolidates "
                              f"the model files of data, tensor and sequence parallel runs: load it into the "
                              f"PipelineModule instead")
    return [(s, json.loads((path / f"{s}meta.json").read_text())) for s in found]


def _consolidated(checkpoint_dir, tag: str | None = None):
    path = _resolve(checkpoint_dir, tag)
    meta = json.loads((path / "meta.json").read_text())
    handles: dict[Path, object] = {}

    def handle(file: Path):
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file]

    seen: set[str] = set()  # tensors every scope holds (replicated over the tensor axis) are written once
    if meta.get("kind") == "pipeline":
        for name, *rest in _pipeline_tensors(path, handle):
            if name not in seen:
                seen.add(name)
                yield name, *rest
        return
    for scope, scope_meta in _scopes(path, meta):
        for name, *rest in _scope_tensors(path, scope, scope_meta, handle):
            if name not in seen:
                seen.add(name)
                yield name, *rest


# a pipeline checkpoint's layer files: one per layer (global index) and model shard (tensor/sequence rank)
_LAYER_FILE = re.compile(r"^(?:sp\d+_)?(?:tp\d+_)?layer_(?P<idx>\d+)-model_states\.safetensors$")


def _pipeline_tensors(path: Path, handle):
    """The layers of a pipeline checkpoint, named ``{layer index}.{name in the layer}`` (the
    PipelineModule's names, and those of an ``nn.Sequential`` of the same layers); each model shard's
    file of a layer contributes its shards. A tied module is written under every index a stage saved
    it at. The weights are the layer files' (the model's dtype)."""
    files = sorted((int(m["idx"]), f.name) for f in path.iterdir() if (m := _LAYER_FILE.match(f.name)))
    if not files:
        raise CheckpointError(f"{path} is a pipeline checkpoint without layer files "
                              f"(layer_XX-model_states.safetensors); the checkpoint is damaged")
    for idx, fname in files:
        f = handle(path / fname)
        for key in f.keys():
            sl = f.get_slice(key)
            yield f"{idx}.{key}", _slice_dtype(sl), tuple(sl.get_shape()), lambda f=f, key=key: f.get_tensor(key)


def _scope_tensors(path: Path, scope: str, meta: dict, handle):
    zero = meta.get("zero")
    aliases: dict[str, str] = dict((meta.get("aliases") or {}).get("model", {}))
    model_files = [path / f"{scope}model.safetensors"] + sorted(path.glob(f"{scope}model_rank*.safetensors"))

    partitioned: dict[str, tuple[tuple[int, ...], Producer]] = {}
    if zero is not None:
        world = zero["world_size"]
        ranks = [path / f"{scope}zero_rank{r}.safetensors" for r in range(world)]
        for file in ranks:
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: the checkpoint was saved by {world} ranks and "
                                      f"every rank's partition is needed to consolidate it")
        per_param = zero.get("layout") == "per_parameter"
        aliases.update(zero.get("aliases", {}))
        for g, spec in enumerate(zero["groups"]):
            if "axis" in spec:  # expert groups: their weights are in model_rank*.safetensors
                continue
            key = f"master.{g}"
            for p in spec["params"]:
                numel = 1
                for d in p["shape"]:
                    numel *= d
                shape = tuple(p["shape"])
                if per_param:
                    def produce(p=p, numel=numel, shape=shape, key=key):
                        pieces = [handle(f).get_slice(key)[p["offset"]:p["offset"] + p["part"]] for f in ranks]
                        return torch.cat(pieces)[:numel].view(shape)
                else:
                    part = spec["partition_numel"]

                    def produce(p=p, numel=numel, shape=shape, key=key, part=part):
                        out = torch.empty(numel, dtype=torch.float32)
                        lo, hi = p["offset"], p["offset"] + numel
                        for r in range(lo // part, (hi - 1) // part + 1 if numel else 0):
                            a, b = max(lo, r * part), min(hi, (r + 1) * part)
                            out[a - lo:b - lo] = handle(ranks[r]).get_slice(key)[a - r * part:b - r * part]
                        return out.view(shape)
                partitioned[p["name"]] = (shape, produce)
    produced: dict[str, tuple[torch.dtype, tuple[int, ...], Producer]] = {}
    for file in model_files:
        if not file.is_file():
            continue
        f = handle(file)
        for name in f.keys():
            if name in partitioned:
                shape, produce = partitioned.pop(name)
                produced[name] = (torch.float32, shape, produce)
            else:
                sl = f.get_slice(name)
                produced[name] = (_slice_dtype(sl), tuple(sl.get_shape()),
                                  lambda f=f, name=name: f.get_tensor(name))
            yield name, *produced[name]
    for name, (shape, produce) in partitioned.items():  # stage 3: parameters are not in model.safetensors
        produced[name] = (torch.float32, shape, produce)
        yield name, *produced[name]
    for alias, target in aliases.items():  # tied names: the same tensor under every name
        if alias in produced:
            continue
        if target not in produced:
            raise CheckpointError(f"{path}: tied name {alias!r} points at {target!r}, which the checkpoint "
                                  f"does not hold; the checkpoint is damaged")
        yield alias, *produced[target]


def write_safetensors_streaming(entries, out_path, metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, dtype, shape, produce)`` entries as one safetensors file, one tensor in memory at
    a time (the header is computed from shapes and dtypes first). Returns the number of tensors."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            size *= d
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in entries:
            t = produce().to(dtype).contiguous().reshape(-1)
            expected = 1
            for d in shape:
                expected *= d
            if t.numel() != expected:
                raise CheckpointError(f"{name}: assembled {t.numel()} elements, expected shape {shape}")
            f.write(t.view(torch.uint8).numpy().tobytes())
    tmp.replace(out_path)
    return len(entries)


def zero_to_fp32(checkpoint_dir, output_file, tag: str | None = None) -> int:
    """Consolidate ``checkpoint_dir`` (a save_dir with ``latest``, or one tag's directory) into
    ``output_file`` (safetensors); returns the number of tensors written."""
    path = _resolve(checkpoint_dir, tag)
    return write_safetensors_streaming(consolidated_tensors(path), output_file,
                                       {"format": "pt", "source": str(path)})


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False,
                                             lazy_mode: bool = False) -> dict[str, torch.Tensor]:
    """The consolidated state dict of a ZeRO checkpoint (any stage, any world size), in memory.

    DeepSpeed's function of the same name: partitioned parameters come back in fp32 (from the masters),
    everything else as saved; tied names the checkpoint records as aliases share one tensor. ``checkpoint_dir``: a save_dir with a
    ``latest`` file, or one tag's directory; ``tag``: which tag (default: ``latest``). Needs host memory
    for the whole model; :func:`zero_to_fp32` streams it to a file instead. ``exclude_frozen_parameters``
    and ``lazy_mode`` are not supported (an error says so): the checkpoint does not record which
    unpartitioned tensors are frozen parameters rather than buffers.
    """
    if exclude_frozen_parameters or lazy_mode:
        which = "exclude_frozen_parameters" if exclude_frozen_parameters else "lazy_mode"
        raise CheckpointError(f"get_fp32_state_dict_from_zero_checkpoint({which}=True) is not supported: a ds "
                              f"checkpoint does not tell frozen parameters from buffers, and tensors are "
                              f"assembled eagerly; call it with the defaults and drop the keys you do not want")
    out: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}  # id(producer) -> tensor: tied names share one tensor
    for name, dtype, _, produce in consolidated_tensors(checkpoint_dir, tag):
        if id(produce) not in made:
            made[id(produce)] = produce().to(dtype).clone()
        out[name] = made[id(produce)]
    return out


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir, tag: str | None = None
                                         ) -> torch.nn.Module:
    """Load the consolidated fp32 weights of a ZeRO checkpoint into a plain ``model`` (strictly: every key
    must match) and return it — DeepSpeed's function of the same name, for leaving ZeRO after training."""
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag))
    return model
