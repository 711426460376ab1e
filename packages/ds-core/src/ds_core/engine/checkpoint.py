"""Engine checkpoints: the atomic, verified checkpoint-directory protocol every layout writes through.

Layout of ``save_dir/tag/`` (the default layout's files; ZeRO and the pipeline add their own):
``model.safetensors`` (module state), ``master.safetensors`` (fp32 master weights, 16-bit runs),
``optimizer.safetensors`` + the JSON half of the optimizer state in ``meta.json`` with config,
counters, world layout, scheduler, loss scaler and client state, and ``rng_rank{r}.safetensors`` /
``rng_rank{r}.json`` per rank. ``save_dir/latest`` names the newest tag. Nothing is unpickled.

The protocol (:func:`writing_checkpoint`), the same for every layout:

1. every rank checks the tag (one directory name, the same on every rank); rank 0 repairs what an
   interrupted save left behind and creates ``save_dir/.tag.partial``;
2. each rank writes its files there; any error on any rank (a full disk, a library error, a bug)
   becomes one :class:`CheckpointError` on every rank, naming the rank, the file and the fix, and
   the partial directory is removed;
3. rank 0 writes ``manifest.json``: the size and CRC-32 of every file in the directory (each rank
   hashes the files it wrote, rank 0 the rest) — its presence marks the checkpoint complete;
4. rank 0 renames ``.tag.partial`` to ``tag`` (an existing ``tag`` first to ``.tag.old``, removed
   after) and, unless told not to, points ``latest`` at it. Files and directories are fsynced first.

Loading (:func:`resolve_tag`) finds the tag, recovers a save interrupted between its two renames
(``.tag.old`` is what ``latest`` named), and verifies every file against the manifest — the work
split across ranks, the outcome agreed — so a damaged file raises the same :class:`CheckpointError`
on every rank before anything is loaded. ``DS_CHECKPOINT_VERIFY=0`` or
``checkpoint_options(verify=False)`` skips the checksums.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import comm
from .checkpoint_files import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    available_tags,
    checkpoint_options,
    committed,
    crc32_file,
    explain_write,
    fsync_dir,
    load_safetensors,
    options,
    read_json,
    tensors_to_safetensors,
    watch_partial,
    write_atomic_text,
    write_json,
)
from .checkpoint_verify import (
    FORMAT,
    MANIFEST_FORMAT,
    CheckpointDamaged,
    digest,
    read_meta,
    verify_checkpoint,
)

__all__ = ["CheckpointError", "CheckpointWriteError", "CheckpointDamaged", "all_agree", "writing_checkpoint",
           "save_tree", "load_tree", "resolve_tag", "verify_checkpoint", "checkpoint_options", "check_tag",
           "write_atomic_text", "write_json", "read_json", "read_meta", "load_safetensors", "rng_state",
           "set_rng_state", "tensors_to_safetensors", "split_optimizer_state", "join_optimizer_state",
           "MANIFEST", "FORMAT"]

_load_tensors = load_safetensors  # the name layouts used before


def check_tag(tag: Any, consequence: str = "nothing was written") -> str:
    """A tag names one directory inside ``save_dir``; raise naming the rule otherwise."""
    if not isinstance(tag, str):
        raise CheckpointError(f"tag {tag!r} is a {type(tag).__name__}: a tag is a string naming one directory "
                              f"inside save_dir, e.g. 'global_step100'")
    problem = None
    if not tag or not tag.strip():
        problem = "is empty"
    elif "/" in tag or "\\" in tag:
        problem = "contains a path separator ('/' or '\\\\')"
    elif tag in (".", ".."):
        problem = "is '.' or '..'"
    elif tag.startswith("."):
        problem = "starts with '.' (names starting with '.' are the protocol's temporary directories)"
    elif any(ord(c) < 32 for c in tag):
        problem = "contains a control character"
    elif len(tag.encode("utf-8", "surrogateescape")) > 200:
        problem = "is longer than 200 bytes"
    elif tag == "latest":
        problem = "is 'latest' (the file naming the newest tag)"
    if problem:
        safe = "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in tag).lstrip(".") or "global_step0"
        raise CheckpointError(f"tag {tag!r} {problem}: a tag names one directory inside save_dir; "
                              f"use e.g. {safe!r} ({consequence})")
    return tag


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
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        if "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"])
        random.setstate(_tupled(meta["python"]))
        if "numpy" in meta:
            import numpy as np

            kind, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))
    except ImportError:
        warnings.warn("the checkpoint holds numpy's random state but numpy is not installed: numpy's "
                      "stream is not restored", stacklevel=3)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the saved random-number state is damaged ({type(exc).__name__}: {exc}); "
                              f"restore the rng_rank files from a copy or load another tag") from None


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tupled(obj):
    return tuple(_tupled(x) for x in obj) if isinstance(obj, list) else obj


# -- agreement between ranks ---------------------------------------------------------------------

def _world() -> tuple[int, int]:
    return (comm.get_rank(), comm.get_world_size()) if comm.is_initialized() else (0, 1)


def _gather_text(text: str) -> list[str]:
    """Every rank's ``text`` (one collective; no collective in a one-process world)."""
    if _world()[1] == 1:
        return [text]
    return comm.all_gather_strings(text)


def all_agree(ok: bool, group=None) -> bool:
    """True only if every rank says ok."""
    if comm.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    comm.all_reduce(flag, op=comm.ReduceOp.MAX, group=group)
    return flag.item() == 0.0


def _describe(exc: Exception, partial: Path) -> str:
    """One line for a failure while writing: ours as is, an OS error explained, anything else named."""
    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, OSError):
        return str(explain_write(Path(exc.filename) if exc.filename else partial, exc))
    return f"{type(exc).__name__}: {exc}"


def _one_message(reports: list[dict], key: str = "error") -> str:
    """The errors of every rank as one text (identical on every rank)."""
    errors = [(r, rep[key]) for r, rep in enumerate(reports) if rep.get(key)]
    if len(reports) == 1:
        return errors[0][1]
    return "; ".join(f"rank {r}: {e}" for r, e in errors)


# -- the directory protocol ----------------------------------------------------------------------

def _repair(root: Path, tag: str) -> None:
    """Undo what a save interrupted by a crash left for ``tag`` (rank 0, before a new save)."""
    final, old = root / tag, root / f".{tag}.old"
    if old.exists():
        if not final.exists() and committed(old):
            os.replace(old, final)  # the crash fell between the two renames: ``old`` is what latest named
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_checkpoint(save_dir: str | os.PathLike, tag: str, rank: int) -> Iterator[Path]:
    """The atomic directory protocol, for any layout: yields ``save_dir/.tag.partial`` to every rank.

    Each rank writes its files inside the ``with`` block — with :func:`tensors_to_safetensors` and
    :func:`write_json`, which checksum as they go (files written otherwise are checksummed by rank 0
    at commit). Only when every rank succeeded is the directory committed (see the module
    docstring); any error on any rank raises the same :class:`CheckpointError` on all of them and
    leaves the previous checkpoint and ``latest`` untouched.

    [Note: no collectives inside the block] The block's code must not call collectives: a rank that
    fails there stops writing at once and meets the others only in the agreement after the block.
    """
    tag_error = ""
    try:
        check_tag(tag)
    except CheckpointError as exc:
        tag_error = str(exc)
    root = Path(save_dir)
    final, partial = root / str(tag), root / f".{tag}.partial"
    save_latest = options().save_latest
    _, world = _world()

    # 1. a valid tag, the same everywhere; rank 0 prepares the directory
    error = ""
    if rank == 0 and not tag_error:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _repair(root, tag)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
        except OSError as exc:
            error = f"cannot write checkpoint directory {root}: {explain_write(partial, exc)}"
    reports = [json.loads(t) for t in _gather_text(json.dumps({"tag": str(tag), "error": error,
                                                                 "tag_error": tag_error}))]
    bad = next((rep["tag_error"] for rep in reports if rep["tag_error"]), "")
    if bad:
        raise CheckpointError(bad)
    tags = {rep["tag"] for rep in reports}
    if len(tags) > 1:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        listing = ", ".join(f"rank {r}: {rep['tag']!r}" for r, rep in enumerate(reports))
        raise CheckpointError(f"the ranks save under different tags ({listing}): every rank must pass the same "
                              f"tag to save_checkpoint (nothing was written)")
    if reports[0]["error"]:
        raise CheckpointError(reports[0]["error"] + "; choose a writable save_dir (nothing was changed)")

    # 2. every rank writes
    error = ""
    with watch_partial(partial) as writer:
        try:
            yield partial
        except Exception as exc:  # noqa: BLE001 - every failure must reach the agreement, whatever its type
            error = _describe(exc, partial)
    reports = [json.loads(t) for t in _gather_text(json.dumps({"error": error, "files": writer.files}))]
    if any(rep["error"] for rep in reports):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _gather_text("")  # the partial directory is gone when any rank raises
        raise CheckpointError(f"checkpoint {tag!r} was not saved to {root}: {_one_message(reports)}. The "
                              f"partial directory was removed; the previous checkpoint and 'latest' are "
                              f"untouched, and training can continue")

    # 3.-4. rank 0 commits: manifest, renames, latest
    error = ""
    if rank == 0:
        try:
            _commit(root, tag, partial, final, reports, world, save_latest)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    outcome = _gather_text(error)[0]
    if outcome:
        raise CheckpointError(f"checkpoint {tag!r} in {root}: {outcome}")


def _commit(root: Path, tag: str, partial: Path, final: Path, reports: list[dict], world: int,
            save_latest: bool) -> None:
    files: dict[str, dict[str, Any]] = {}
    for rep in reports:
        files.update(rep["files"])
    try:
        on_disk = {p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()}
        for name in sorted(on_disk - set(files)):  # written without the protocol's helpers
            size, crc = crc32_file(partial / name, sync=True)
            files[name] = {"bytes": size, "crc32": crc}
        lost = sorted(set(files) - on_disk)
        if lost:
            raise CheckpointError(f"files written by other ranks are not in {partial} ({', '.join(lost[:5])}): "
                                  f"save_dir must be one file system shared by every rank")
        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "world_size": world, "algorithm": "crc32",
                    "files": dict(sorted(files.items()))}
        manifest["digest"] = digest(manifest["files"])
        text = json.dumps(manifest, indent=1)
        with open(partial / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(partial)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{explain_write(partial / MANIFEST, exc)}; the partial directory was removed, "
                              f"the previous checkpoint and 'latest' are untouched") from exc
    except CheckpointError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = root / f".{tag}.old"
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
    except OSError as exc:
        if old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"renaming {partial} to {final} failed ({exc}); the previous checkpoint is "
                              f"untouched") from exc
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    if save_latest:
        try:
            write_atomic_text(root / "latest", tag)
        except CheckpointError as exc:
            raise CheckpointError(f"the checkpoint is complete in {final}, but 'latest' could not be updated "
                                  f"({exc}); 'latest' still names the previous tag: load this one with "
                                  f"tag={tag!r}") from exc
        fsync_dir(root)


def save_tree(save_dir: str | os.PathLike, tag: str, shared: dict[str, Any], per_rank: dict[str, Any],
              rank: int, plain: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint atomically (see :func:`writing_checkpoint`).

    ``shared`` (written by rank 0): ``files`` = {name: tensors} and ``meta`` = JSON dict.
    ``per_rank`` (written by every rank): {name: tensors} and ``meta`` = JSON dict.
    ``plain`` (written by rank 0): {file name: tensors} stored with every name and ``format: pt``
    metadata, for readers without ds (e.g. the consolidated 16-bit weights); not read by :func:`load_tree`.
    """
    with writing_checkpoint(save_dir, tag, rank) as partial:
        for name, tensors in per_rank.get("files", {}).items():
            tensors_to_safetensors(tensors, partial / f"{name}_rank{rank}.safetensors")
        write_json(partial / f"rng_rank{rank}.json", per_rank.get("meta", {}))
        if rank == 0:
            meta = dict(shared["meta"], format=FORMAT, aliases={})
            for name, tensors in shared["files"].items():
                meta["aliases"][name] = tensors_to_safetensors(tensors, partial / f"{name}.safetensors")
            for file, tensors in (plain or {}).items():
                tensors_to_safetensors(tensors, partial / file, dedupe=False, metadata={"format": "pt"})
            write_json(partial / "meta.json", meta, indent=1)
    return Path(save_dir) / tag


# -- loading -------------------------------------------------------------------------------------

def _read_latest(root: Path) -> str:
    latest = root / "latest"
    if not latest.is_file():
        raise CheckpointError(f"no 'latest' file in {root}: pass tag= or point load_dir at a "
                              f"directory written by save_checkpoint{available_tags(root)}")
    try:
        tag = latest.read_bytes().decode("utf-8").strip()
        return check_tag(tag, "nothing was loaded")
    except (UnicodeDecodeError, CheckpointError, OSError) as exc:
        raise CheckpointError(f"{latest} does not hold a tag name ({exc}); it should hold one line, the tag "
                              f"of the newest checkpoint: rewrite it or pass tag={available_tags(root)}") from None


def _locate(load_dir: str | os.PathLike, tag: str | None) -> Path:
    """This process's view: the directory to load, with no collective (see :func:`resolve_tag`)."""
    root = Path(load_dir)
    tag = _read_latest(root) if tag is None else check_tag(tag, "nothing was loaded")
    path = root / tag
    if committed(path):
        return path
    old = root / f".{tag}.old"
    if committed(old):
        warnings.warn(f"checkpoint {path} is missing: a save of tag {tag!r} was interrupted between its two "
                      f"renames; loading the previous complete copy {old} (what 'latest' named). The next "
                      f"save_checkpoint restores it under its name", stacklevel=4)
        return old
    detail = ""
    if (root / f".{tag}.partial").exists():
        detail = f"; {root / f'.{tag}.partial'} is what a save interrupted before its commit left (not loadable)"
    elif path.is_dir():
        detail = f"; {path} has neither {MANIFEST} nor meta.json"
    raise CheckpointError(f"checkpoint {path} does not exist or is incomplete{detail}{available_tags(root)}")


def resolve_tag(load_dir: str | os.PathLike, tag: str | None, *, collective: bool | None = None) -> Path:
    """The checkpoint directory to load, verified: ``load_dir/tag`` (``latest`` when tag is None).

    ``collective`` (default: when a process group of more than one rank exists) makes this a
    collective call: every rank verifies a share of the files and every rank raises the same
    :class:`CheckpointError` when any rank found a problem. Without it, this process verifies all.
    """
    rank, world = _world()
    if collective is False or world == 1:
        path = _locate(load_dir, tag)
        verify_checkpoint(path, 0, 1)
        return path
    report: dict[str, Any] = {"path": "", "error": "", "problems": []}
    try:
        path = _locate(load_dir, tag)
        report["path"] = str(path)
        verify_checkpoint(path, rank, world)
    except CheckpointDamaged as exc:
        report["problems"] = exc.problems
    except CheckpointError as exc:
        report["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - agreed below, so no rank is left waiting
        report["error"] = f"{type(exc).__name__}: {exc}"
    reports = [json.loads(t) for t in _gather_text(json.dumps(report))]
    problems = [p for rep in reports for p in rep["problems"]]
    if problems and not any(rep["error"] for rep in reports):
        raise CheckpointDamaged(Path(reports[0]["path"]), sorted(problems))
    if any(rep["error"] for rep in reports):
        texts = {rep["error"] for rep in reports if rep["error"]}
        raise CheckpointError(texts.pop() if len(texts) == 1 else _one_message(reports))
    paths = {rep["path"] for rep in reports}
    if len(paths) > 1:
        raise CheckpointError(f"the ranks resolved different checkpoints ({', '.join(sorted(paths))}): pass the "
                              f"same load_dir and tag on every rank, on a file system they all share")
    return Path(reports[0]["path"])


def load_tree(path: Path, rank: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]], tuple]:
    """Return (meta, shared tensor files by name, (rng tensors, rng meta) of this rank)."""
    meta = read_meta(path)
    files = {name: load_safetensors(path / f"{name}.safetensors", aliases)
             for name, aliases in meta["aliases"].items()}
    saved_world = meta.get("world_size", 1)
    r = rank if rank < saved_world else rank % saved_world
    rng_file = path / f"rng_rank{r}.safetensors"
    rng = (load_safetensors(rng_file) if rng_file.exists() else {},
           read_json(path / f"rng_rank{r}.json"))
    return meta, files, rng
