"""Where checkpoint tensors come from: a safetensors directory (one file or index-sharded) or a dict.

A source answers ``shape(name)`` from metadata alone and ``read(name, rows, cols)`` reads only the
requested slice (``safetensors``' ``get_slice``), so a tensor-parallel rank reads its 1/tp of each
weight and never the whole model. Nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ds_core.errors import ConfigError

__all__ = ["TensorSource", "SafetensorsDir", "DictSource", "RenamedSource", "CheckpointError"]


class CheckpointError(ConfigError):
    """A checkpoint directory is incomplete or does not fit the model; says which file or tensor."""


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor: ...


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _index(rows: slice | None, cols: slice | None, ndim: int):
    if ndim == 1:
        return (rows if rows is not None else slice(None),)
    return (rows if rows is not None else slice(None), cols if cols is not None else slice(None))


class SafetensorsDir:
    """``model.safetensors`` or ``model.safetensors.index.json`` + shards (any ``*.safetensors`` name)."""

    def __init__(self, path: str | Path, files: list[str | Path] | None = None,
                 aliases: dict[str, str] | None = None) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {path}: not a directory; pass the directory save_pretrained wrote")
        index = self.path / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        self._aliases: dict[str, str] = {}
        if files is not None:  # an explicit list (a ds engine checkpoint's model.safetensors, DeepSpeed's json)
            missing = [str(f) for f in files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {path}: files {', '.join(missing[:5])} are missing")
            for file in files:
                with safe_open(str(self.path / file), framework="pt") as f:
                    for name in f.keys():
                        self._where[name] = self.path / file
        elif index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"checkpoint {path}: {len(missing)} of {len(files)} shards listed in "
                    f"model.safetensors.index.json are missing: {', '.join(missing[:5])}; copy the whole "
                    "directory (every model-XXXXX-of-XXXXX.safetensors) or re-save the model")
            for name, file in weight_map.items():
                self._where[name] = self.path / file
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"checkpoint {path}: no *.safetensors files; save the model with "
                                      "save_pretrained(dir, safe_serialization=True)")
            for file in files:
                with safe_open(str(self.path / file), framework="pt") as f:
                    for name in f.keys():
                        self._where[name] = self.path / file
        for alias, target in (aliases or {}).items():  # tied weights stored once
            if target in self._where:
                self._aliases[alias] = target
                self._where.setdefault(alias, self._where[target])
        self._open: dict[Path, object] = {}
        self._safe_open = safe_open

    def _file(self, name: str):
        name = self._aliases.get(name, name)
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"checkpoint {self.path}: no tensor {name!r}")
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = self._safe_open(str(path), framework="pt")
        return handle

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(self._aliases.get(name, name)).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._file(name).get_slice(self._aliases.get(name, name)).get_dtype()]

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        key = self._aliases.get(name, name)
        sl = self._file(name).get_slice(key)
        if not sl.get_shape():  # a scalar
            return self._file(name).get_tensor(key)
        if rows is None and cols is None:
            return sl[:]
        return sl[_index(rows, cols, len(sl.get_shape()))]

    def close(self) -> None:
        self._open.clear()


class DictSource:
    """A state dict in memory (e.g. a Hugging Face model's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        t = self.tensors[name].detach()
        if rows is None and cols is None:
            return t
        return t[_index(rows, cols, t.dim())]


class RenamedSource:
    """``inner`` seen under other names: a dict ``{our name: inner name}`` or a function
    ``inner name -> our name`` (None drops the tensor)."""

    def __init__(self, inner: TensorSource, mapping: Mapping[str, str] | Callable[[str], str | None]) -> None:
        self.inner = inner
        if callable(mapping):
            inner_names = inner.names()
            self._map = {}
            for name in inner_names:
                ours = mapping(name)
                if ours is not None:
                    self._map[ours] = name
        else:
            self._map = dict(mapping)

    def names(self) -> set[str]:
        return set(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._map[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._map[name])

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        return self.inner.read(self._map[name], rows, cols)
