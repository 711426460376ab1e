"""Tensor-parallel shards in state dicts and checkpoints: self-describing keys, resharding on load.

[Note: shard keys] On more than one rank every tensor-parallel parameter is *registered* under a
name that says what it is — so its ``named_parameters()`` name and ``state_dict()`` key, and every
checkpoint layout keyed by them, can never mistake a shard for the full tensor or for another rank's
shard (layouts gather every rank's files into one namespace); ``module.weight`` still works::

    model.layers.0.self_attn.q_proj.weight#tp:1/2:dim0:48x48:24+24
    model.layers.0.self_attn.k_proj.weight#rep:dim0:16x48:0+16

``<full name>#tp:<rank>/<size>:dim<d>:<full shape>:<start>+<length>,...`` is rank ``rank``'s rows of
the full tensor along ``d``; ``#rep:`` marks rows every tensor rank holds identically (replicated KV
heads), saved once. Any reader can rebuild the full tensor from the keys alone — ds-zero's
``ds zero-to-fp32`` does — and :func:`load_tp_checkpoint` reads any tensor-parallel size's shards
into a model sharded any other way (or not at all). ``load_state_dict`` accepts this rank's keys, a
full (unsharded) state dict, or shards saved at another size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ds_core.errors import ConfigError

from .shards import ShardInfo, read_runs

__all__ = ["shard_key", "parse_shard_key", "ShardKey", "install_shard_keys", "stitch", "load_tp_checkpoint"]

_KEY = re.compile(r"^(?P<name>.+)#(?:tp:(?P<rank>\d+)/(?P<size>\d+)|rep):dim(?P<dim>\d+):(?P<shape>\d+(?:x\d+)*)"
                  r":(?P<runs>\d+\+\d+(?:,\d+\+\d+)*)$")


class ShardKey:
    """A parsed shard key: the full tensor's ``name``, ``dim``, ``full_shape`` and ``runs``."""

    __slots__ = ("name", "rank", "size", "dim", "full_shape", "runs", "replicated")

    def __init__(self, name, rank, size, dim, full_shape, runs, replicated) -> None:
        self.name, self.rank, self.size, self.dim = name, rank, size, dim
        self.full_shape, self.runs, self.replicated = full_shape, runs, replicated

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(n for _, n in self.runs)
        return tuple(shape)


def shard_key(full_name: str, info: ShardInfo, rank: int, size: int) -> str:
    shape = "x".join(str(d) for d in info.full_shape)
    runs = ",".join(f"{s}+{n}" for s, n in info.runs)
    head = "rep" if info.replicated else f"tp:{rank}/{size}"
    return f"{full_name}#{head}:dim{info.dim}:{shape}:{runs}"


def parse_shard_key(key: str) -> ShardKey | None:
    """The :class:`ShardKey` of ``key``, or ``None`` for an ordinary state-dict key."""
    m = _KEY.match(key)
    if m is None:
        return None
    runs = tuple(tuple(int(v) for v in r.split("+")) for r in m["runs"].split(","))
    shape = tuple(int(d) for d in m["shape"].split("x"))
    rank = int(m["rank"]) if m["rank"] is not None else None
    size = int(m["size"]) if m["size"] is not None else None
    return ShardKey(m["name"], rank, size, int(m["dim"]), shape, runs, m["rank"] is None)


def stitch(info: ShardInfo, pieces) -> torch.Tensor:
    """This rank's tensor (rows ``info.runs`` along ``info.dim``) from ``pieces``: ``(ShardKey, read)``
    pairs where ``read(dim, runs)`` returns those rows of that piece (its own local row order).

    Raises naming the rows no piece holds.
    """
    want = [r for s, n in info.runs for r in range(s, s + n)]
    where: dict[int, tuple[int, int]] = {}  # full row -> (piece index, local row)
    for i, (key, _) in enumerate(pieces):
        if tuple(key.full_shape) != tuple(info.full_shape) or key.dim != info.dim:
            continue
        local = 0
        for s, n in key.runs:
            for r in range(s, s + n):
                where.setdefault(r, (i, local + r - s))
            local += n
    missing = [r for r in want if r not in where]
    if missing:
        raise ConfigError(f"the saved shards of a {tuple(info.full_shape)} tensor do not hold rows "
                          f"{missing[:4]}{'...' if len(missing) > 4 else ''} along dim {info.dim}; the checkpoint is "
                          f"incomplete (every tensor rank's files are needed)")
    out_parts = []
    # read contiguous stretches from one piece at a time
    i = 0
    while i < len(want):
        piece, local = where[want[i]]
        j = i + 1
        while j < len(want) and where[want[j]] == (piece, local + (j - i)):
            j += 1
        out_parts.append(pieces[piece][1](info.dim, ((local, j - i),)))
        i = j
    return out_parts[0] if len(out_parts) == 1 else torch.cat(out_parts, dim=info.dim)


def _rows(t: torch.Tensor):
    def read(dim, runs):
        return torch.cat([t.narrow(dim, s, n) for s, n in runs], dim=dim)
    return read


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Accept a full (unsharded) tensor or shards saved at another size for each of this layer's shards."""
    mine = {}
    for pname, p in module._parameters.items():
        info = getattr(p, "ds_tp", None)
        if p is None or info is None or prefix + pname in state_dict:
            continue
        full_name = prefix + info.target
        if full_name in state_dict and tuple(state_dict[full_name].shape) == tuple(info.full_shape):
            mine[pname] = _rows(state_dict[full_name])(info.dim, info.runs)
            continue
        pieces = [(parse_shard_key(k), _rows(v)) for k, v in state_dict.items() if k.startswith(full_name + "#")]
        pieces = [(k, r) for k, r in pieces if k is not None and k.name == full_name]
        if pieces:  # shards saved at another tensor-parallel size
            mine[pname] = stitch(info, pieces)
    if mine:  # the sources were consumed here: do not report them as unexpected
        for p in module._parameters.values():
            info = getattr(p, "ds_tp", None)
            if info is not None:
                full_name = prefix + info.target
                for key in [k for k in state_dict if k == full_name or k.startswith(full_name + "#")]:
                    del state_dict[key]
        for pname, value in mine.items():
            state_dict[prefix + pname] = value


def install_shard_keys(module: nn.Module) -> None:
    """Let a tensor-parallel layer load full tensors or other sizes' shards (idempotent)."""
    if getattr(module, "_ds_shard_keys", False) or module.tp.size == 1:
        return
    module._ds_shard_keys = True
    module.register_load_state_dict_pre_hook(_load_pre_hook)


# -- engine checkpoints --------------------------------------------------------------------------

# an engine checkpoint's model files: "model.safetensors", one per scope ("tp1_model.safetensors",
# "pp0_tp1_model.safetensors") and the per-data-rank ones of sharded experts ("tp0_model_rank1.safetensors")
_MODEL_FILE = re.compile(r"^(?:pp\d+_)?(?:sp\d+_)?(?:tp\d+_)?model(?:_rank\d+)?\.safetensors$")


# a pipeline checkpoint's model files: one per layer (global index) and model shard
# ("tp1_layer_03-model_states.safetensors"); their tensors are named "{layer index}.{name in the layer}",
# the PipelineModule's names (and an nn.Sequential's of the same layers)
_LAYER_FILE = re.compile(r"^(?:sp\d+_)?(?:tp\d+_)?layer_(?P<idx>\d+)-model_states\.safetensors$")


def _checkpoint_files(path: Path) -> list[tuple[Path, str]]:
    """``(file, prefix)`` of every model file: its tensors' names are ``prefix + key``."""
    if path.is_file():
        return [(path, "")]
    if (path / "latest").is_file() and not (path / "meta.json").is_file():
        path = path / (path / "latest").read_text().strip()
    files = [(f, "") for f in sorted(path.glob("*.safetensors")) if _MODEL_FILE.match(f.name)]
    files += [(f, f"{int(m['idx'])}.") for f in sorted(path.glob("*.safetensors"))
              if (m := _LAYER_FILE.match(f.name))]
    if not files:
        raise ConfigError(f"{path} holds no model tensors (model.safetensors, tp{{t}}_model.safetensors per "
                          f"tensor rank, or a pipeline's tp{{t}}_layer_XX-model_states.safetensors); pass an engine "
                          f"checkpoint directory or a .safetensors file")
    return files


def _aliases(file: Path) -> dict[str, str]:
    """Names a model file of an engine checkpoint stores under another name (tied weights are stored
    once; the scope's JSON, ``{scope}meta.json`` or ``meta.json``, lists the others)."""
    stem = file.name[:-len(".safetensors")]
    if not _MODEL_FILE.match(file.name) or "_rank" in stem:
        return {}
    scope = stem[:-len("model")]
    meta = file.parent / f"{scope}meta.json"
    if not meta.is_file():
        return {}
    return dict(json.loads(meta.read_text()).get("aliases", {}).get("model", {}))


def _tied_names(model: nn.Module) -> dict[str, list[int]]:
    """A PipelineModule's tied modules (``tied_modules.{key}``): key -> the global layer indices whose
    files may hold it, this stage's first (a stage saves its copy under its first index using it)."""
    indices, parts = getattr(model, "tied_indices", None), getattr(model, "parts", None)
    if not isinstance(indices, dict) or parts is None:
        return {}
    lo, hi = parts[model.stage_id], parts[model.stage_id + 1]
    return {key: sorted(idx, key=lambda i: (not lo <= i < hi, i)) for key, idx in indices.items()}


def load_tp_checkpoint(model: nn.Module, checkpoint, *, strict: bool = True) -> nn.Module:
    """Load the model weights of an engine checkpoint saved at any tensor-parallel size (``save_dir``
    with ``latest``, one tag's directory, or a consolidated ``.safetensors`` file) into ``model``,
    sharded at any size or not at all. Each tensor is read from the files that hold its rows, only
    those rows. Optimizer state does not follow (a new tensor-parallel size shards it differently).

    A pipeline checkpoint (one file per layer and tensor rank) gives its tensors the names
    ``{layer index}.{name in the layer}``: those of a ``PipelineModule`` (any stage partition, any
    tensor-parallel size; each stage loads its own layers) and of an ``nn.Sequential`` of the same layers.
    A pipeline's tied module (``tied_modules.{key}``) is read from this stage's first index using it, or
    from the first index saved.
    """
    files = _checkpoint_files(Path(checkpoint))
    plain: dict[str, tuple[object, str]] = {}
    shards: dict[str, list[tuple[ShardKey, object, str]]] = {}
    for f, prefix in files:
        h = safe_open(str(f), framework="pt")
        entries = [(prefix + key, key) for key in h.keys()] + [(prefix + a, t) for a, t in _aliases(f).items()]
        for key, stored in entries:
            parsed = parse_shard_key(key)
            if parsed is None:
                plain.setdefault(key, (h, stored))
            else:
                shards.setdefault(parsed.name, []).append((parsed, h, stored))

    def reader(h, key):
        def read(dim, runs):
            return read_runs(h.get_slice(key), dim, runs)
        return read

    tied = _tied_names(model)
    missing: list[str] = []
    with torch.no_grad():
        for mname, module in model.named_modules():
            prefix = f"{mname}." if mname else ""
            if prefix.startswith("tied_modules.") and prefix.split(".")[1] in tied:
                prefix = next((f"{i}.{prefix.split('.', 2)[2]}" for i in tied[prefix.split(".")[1]]
                               if any(k.startswith(f"{i}.") for k in (*plain, *shards))), prefix)
            for pname, p in list(module._parameters.items()) + [
                    (b, t) for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set]:
                if p is None:
                    continue
                info = getattr(p, "ds_tp", None)
                full_name = prefix + (info.target if info else pname)
                if info is not None:
                    if full_name in shards:
                        value = stitch(info, [(k, reader(h, key)) for k, h, key in shards[full_name]])
                    elif full_name in plain:
                        h, key = plain[full_name]
                        value = reader(h, key)(info.dim, info.runs)
                    else:
                        missing.append(full_name)
                        continue
                elif full_name in plain:
                    h, key = plain[full_name]
                    value = h.get_tensor(key)
                elif full_name in shards:  # a sharded checkpoint, loaded into an unsharded model
                    full = ShardInfo(pname, shards[full_name][0][0].dim, shards[full_name][0][0].full_shape,
                                     ((0, shards[full_name][0][0].full_shape[shards[full_name][0][0].dim]),))
                    value = stitch(full, [(k, reader(h, key)) for k, h, key in shards[full_name]])
                else:
                    missing.append(full_name)
                    continue
                if tuple(value.shape) != tuple(p.shape):
                    raise ConfigError(f"{full_name}: the checkpoint gives shape {tuple(value.shape)}, the model has "
                                      f"{tuple(p.shape)}; load a checkpoint of this model")
                p.copy_(value.to(p.dtype))
    if missing and strict:
        raise ConfigError(f"{checkpoint} lacks {len(missing)} tensors of {type(model).__name__}: "
                          f"{', '.join(sorted(set(missing))[:8])}; load a checkpoint of this model or pass strict=False")
    return model
