"""Build a model too large for one rank: construct it on the meta device, shard it, read only this
rank's slices from safetensors files.

:func:`meta_init` creates parameters on the meta device (no memory, no initialisation) while buffers
(rotary frequencies, embedding scales) are computed normally. :func:`~ds_parallel.apply.apply_plan`
then gives the meta parameters this rank's shapes, and :func:`load_sharded` reads each one's rows —
``safe_open(...).get_slice(name)[a:b]`` reads just those bytes — from a ``model.safetensors`` file or
a Hugging Face shard directory (``model.safetensors.index.json``). :func:`from_pretrained` does the
three steps for a Hugging Face model directory.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ds_core.errors import ConfigError

from .grads import carry_over
from .layers import shard_info
from .shards import read_runs

__all__ = ["meta_init", "SafetensorsCheckpoint", "load_sharded", "from_pretrained", "read_runs"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@contextmanager
def meta_init():
    """Inside, every parameter a module registers lands on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class SafetensorsCheckpoint:
    """A read-only view over one ``.safetensors`` file or a directory of them (with or without an index).

    Each file is opened once and read lazily; ``slice(name, dim, runs)`` reads only the requested rows.
    """

    def __init__(self, path) -> None:
        path = Path(path)
        self.path = path
        self.where: dict[str, Path] = {}
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            for name, file in index["weight_map"].items():
                self.where[name] = path / file
            files = []
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors"))
        else:
            raise ConfigError(f"checkpoint {path} is neither a .safetensors file nor a directory holding them")
        if not files and not self.where:
            raise ConfigError(f"{path} holds no .safetensors files (nor a model.safetensors.index.json)")
        self._open: dict[Path, object] = {}
        for file in files:
            for name in self._handle(file).keys():
                self.where.setdefault(name, file)

    def _handle(self, file: Path):
        if file not in self._open:
            if not file.is_file():
                raise ConfigError(f"{file} (named by {self.path}'s index) is missing")
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[name]).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self.where[name]).get_tensor(name)

    def slice(self, name: str, dim: int, runs) -> torch.Tensor:
        """Rows ``runs`` (``(start, length)`` pairs) of ``name`` along ``dim``, concatenated."""
        return read_runs(self._handle(self.where[name]).get_slice(name), dim, runs)

    def close(self) -> None:
        self._open.clear()


def _checkpoint_name(name: str, ckpt: SafetensorsCheckpoint, prefix: str) -> str | None:
    """The checkpoint key of a model tensor (allowing for a base-model prefix on either side)."""
    if name in ckpt:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in ckpt:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in ckpt:
        return f"{prefix}.{name}"
    return None


def load_sharded(model: nn.Module, checkpoint, *, strict: bool = True, dtype: torch.dtype | None = None,
                 device=None) -> nn.Module:
    """Fill ``model``'s parameters (and persistent buffers) from safetensors, each sharded parameter
    reading only its own rows. Meta parameters are materialized on ``device`` (default CPU).

    ``strict``: a model tensor the checkpoint lacks is an error listing them (tied weights are read
    once, through whichever name the checkpoint has). Values are cast to the model's dtype, or ``dtype``.
    """
    ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
    prefix = getattr(model, "base_model_prefix", "")
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()) + [
                (b, t) for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set]:
            if p is None:
                continue
            holders.setdefault(id(p), []).append((module, pname, f"{mname}.{pname}" if mname else pname))
            tensors[id(p)] = p
    missing: list[str] = []
    with torch.no_grad():
        for pid, places in holders.items():
            t = tensors[pid]
            info = shard_info(t)
            found = None
            for _module, pname, full in places:
                mprefix = full[:-len(pname)]
                key = _checkpoint_name(mprefix + (info.target if info else pname), ckpt, prefix)
                if key is not None:
                    found = key
                    break
            if found is None:
                missing.append(places[0][2])
                continue
            shape = ckpt.shape(found)
            if info is not None:
                if tuple(shape) != tuple(info.full_shape):
                    raise ConfigError(f"{found} has shape {tuple(shape)} in {ckpt.path} but the model's unsharded "
                                      f"shape is {tuple(info.full_shape)}; load the checkpoint of this model")
                value = ckpt.slice(found, info.dim, info.runs)
            else:
                if tuple(shape) != tuple(t.shape):
                    raise ConfigError(f"{found} has shape {tuple(shape)} in {ckpt.path} but the model's is "
                                      f"{tuple(t.shape)}; load the checkpoint of this model")
                value = ckpt.tensor(found)
            target_dtype = dtype or t.dtype
            target_device = device if device is not None else (torch.device("cpu") if t.is_meta else t.device)
            value = value.to(dtype=target_dtype if t.is_floating_point() else value.dtype, device=target_device)
            if t.is_meta or t.device != target_device or t.dtype != value.dtype:
                new = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
                carry_over(t, new)
                for module, pname, _ in places:
                    if pname in module._parameters:
                        module._parameters[pname] = new
                    else:
                        module._buffers[pname] = new
            else:
                t.copy_(value)
    if missing and strict:
        raise ConfigError(f"{ckpt.path} lacks {len(missing)} tensors of {type(model).__name__}: "
                          f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; load the checkpoint of "
                          f"this model, or pass strict=False to keep them as they are")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConfigError(f"parameters {', '.join(still_meta[:8])} are still on the meta device after loading "
                          f"{ckpt.path} (not in the checkpoint); initialise them or load a complete checkpoint")
    return model


def from_pretrained(path, *, group=None, tp_size: int | None = None, dtype: torch.dtype | None = None,
                    model_class=None, overrides: dict | None = None, **find_kwargs) -> nn.Module:
    """A Hugging Face model directory, built sharded: config -> meta model -> plan -> this rank's slices.

    ``model_class`` defaults to ``AutoModelForCausalLM``; ``group``/``tp_size`` as in
    :func:`~ds_parallel.apply.tensor_parallel`. Needs ``transformers`` (``pip install ds-parallel[hf]``).
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - the [hf] extra
        raise ConfigError("from_pretrained needs transformers: pip install 'ds-parallel[hf]'") from exc
    from .apply import tensor_parallel

    config = AutoConfig.from_pretrained(str(path))
    cls = model_class or AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with meta_init():
        model = cls.from_config(config, **kwargs)
    model = tensor_parallel(model, tp_size, group, overrides=overrides, broadcast=False, **find_kwargs)
    load_sharded(model, path)
    return model.eval()
