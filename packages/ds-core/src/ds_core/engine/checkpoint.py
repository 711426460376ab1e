"""Engine checkpoints: one directory per tag, safetensors for tensors, JSON for everything else.

Layout of ``save_dir/tag/``: ``model.safetensors`` (module state), ``master.safetensors`` (fp32
master weights, 16-bit runs), ``optimizer.safetensors`` + the JSON half of the optimizer state in
``meta.json`` with config, counters, world layout, scheduler, loss scaler and client state, and
``rng_rank{r}.safetensors`` / ``rng_rank{r}.json`` per rank. ``save_dir/latest`` names the newest tag.

Writes go to ``save_dir/.tag.partial`` and are renamed into place only when every rank succeeded,
so a crash or a full disk mid-write leaves the previous checkpoint loadable. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import comm
from ..errors import DSError

__all__ = ["CheckpointError", "all_agree", "writing_checkpoint", "save_tree", "load_tree", "write_atomic_text", "rng_state", "set_rng_state",
           "tensors_to_safetensors"]

FORMAT = "ds-checkpoint-1"


class CheckpointError(DSError, RuntimeError):
    """A checkpoint cannot be written or does not fit the model being loaded."""


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tensors_to_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Save tensors; tensors sharing storage (tied weights) are stored once. Returns the aliases."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.contiguous().cpu().clone() if not t.is_contiguous() or t.storage_offset() or \
            t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.cpu()
    save_file(unique, str(path))
    return aliases


def _load_tensors(path: Path, aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    out = load_file(str(path))
    for name, target in (aliases or {}).items():
        out[name] = out[target]
    return out


# -- optimizer state <-> (tensors, json) -------------------------------------------------------

def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- rng -----------------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta: dict[str, Any] = {"python": _jsonable(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    random.setstate(_tupled(meta["python"]))
    if "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


# -- the directory protocol ----------------------------------------------------------------------

def all_agree(ok: bool, group=None) -> bool:
    """True only if every rank says ok."""
    if comm.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    comm.all_reduce(flag, op=comm.ReduceOp.MAX, group=group)
    return flag.item() == 0.0


@contextmanager
def writing_checkpoint(save_dir: str | os.PathLike, tag: str, rank: int) -> Iterator[Path]:
    """The atomic directory protocol, for any layout: yields ``save_dir/.tag.partial`` to every rank.

    Rank 0 prepares the directory (every rank fails alike if it cannot); each rank writes its files
    inside the ``with`` block; only when every rank succeeded is the directory renamed to
    ``save_dir/tag`` and ``latest`` updated. Any write error on any rank raises
    :class:`CheckpointError` on all of them and leaves the previous checkpoint untouched.
    """
    root = Path(save_dir)
    final, partial = root / tag, root / f".{tag}.partial"
    error = ""
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
        except OSError as exc:
            error = f"cannot write checkpoint directory {root}: {exc}"
    if not all_agree(not error):
        raise CheckpointError((error or f"rank 0 cannot write checkpoint directory {root}") +
                              "; choose a writable save_dir (nothing was changed)")
    try:
        yield partial
    except (OSError, RuntimeError, TypeError, ValueError) as exc:
        error = f"rank {rank} failed writing {partial}: {exc}"
    if not all_agree(not error):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError((error or "another rank failed writing the checkpoint") +
                              "; the previous checkpoint is untouched")
    if rank == 0:
        old = root / f".{tag}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        write_atomic_text(root / "latest", tag)
    if comm.get_world_size() > 1:
        comm.barrier()


def save_tree(save_dir: str | os.PathLike, tag: str, shared: dict[str, Any], per_rank: dict[str, Any],
              rank: int) -> Path:
    """Write a checkpoint atomically (see :func:`writing_checkpoint`).

    ``shared`` (written by rank 0): ``files`` = {name: tensors} and ``meta`` = JSON dict.
    ``per_rank`` (written by every rank): {name: tensors} and ``meta`` = JSON dict.
    """
    with writing_checkpoint(save_dir, tag, rank) as partial:
        for name, tensors in per_rank.get("files", {}).items():
            tensors_to_safetensors(tensors, partial / f"{name}_rank{rank}.safetensors")
        (partial / f"rng_rank{rank}.json").write_text(json.dumps(per_rank.get("meta", {})))
        if rank == 0:
            meta = dict(shared["meta"], format=FORMAT, aliases={})
            for name, tensors in shared["files"].items():
                meta["aliases"][name] = tensors_to_safetensors(tensors, partial / f"{name}.safetensors")
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    return Path(save_dir) / tag


def resolve_tag(load_dir: str | os.PathLike, tag: str | None) -> Path:
    root = Path(load_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no 'latest' file in {root}: pass tag= or point load_dir at a "
                                  f"directory written by save_checkpoint")
        tag = latest.read_text().strip()
    path = root / tag
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is incomplete (no meta.json)")
    return path


def load_tree(path: Path, rank: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]], tuple]:
    """Return (meta, shared tensor files by name, (rng tensors, rng meta) of this rank)."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    files = {name: _load_tensors(path / f"{name}.safetensors", aliases)
             for name, aliases in meta["aliases"].items()}
    saved_world = meta.get("world_size", 1)
    r = rank if rank < saved_world else rank % saved_world
    rng_file = path / f"rng_rank{r}.safetensors"
    rng = (load_file(str(rng_file)) if rng_file.exists() else {},
           json.loads((path / f"rng_rank{r}.json").read_text()))
    return meta, files, rng
