"""Reading the checkpoints ``init_inference(checkpoint=...)`` accepts, as a tensor source.

- a ``save_pretrained`` directory: ``config.json`` + ``model.safetensors`` or index-sharded files
  (and ``ds_quant.json`` when ds-compress wrote it);
- a ds engine checkpoint (``engine.save_checkpoint(dir)``): ``dir/latest`` names the tag, the module
  state is ``dir/<tag>/model.safetensors``, tied weights are aliases in ``meta.json``;
- DeepSpeed's checkpoint description ``{"type": "...", "checkpoints": [files], "base_dir": dir}``
  (a dict or a JSON file) listing safetensors files.

Nothing is unpickled: ``.bin``/``.pt`` checkpoints are refused with the conversion to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models.build import read_quant_scheme
from .models.config import read_hf_config
from .models.sources import CheckpointError, SafetensorsDir, TensorSource

__all__ = ["CheckpointInfo", "open_checkpoint"]


@dataclass
class CheckpointInfo:
    source: TensorSource
    hf_config: dict | None  # config.json when the checkpoint has one
    quant_scheme: dict | None  # ds_quant.json
    kind: str  # "hf", "ds", "list"
    where: str


def _refuse_pickles(path: Path) -> None:
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if pickles and not list(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path} holds only pickled weights ({', '.join(pickles[:3])}); ds never "
                              "unpickles checkpoints. Re-save with save_pretrained(dir, safe_serialization=True)")


def open_checkpoint(checkpoint: Any) -> CheckpointInfo:
    if isinstance(checkpoint, dict):
        return _listed(checkpoint, Path(checkpoint.get("base_dir", ".")), "checkpoint description")
    path = Path(checkpoint)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        return _listed(data, Path(data.get("base_dir", path.parent)), str(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a save_pretrained directory, a ds "
                              "engine checkpoint directory or a checkpoint description JSON")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; pass its directory")
    latest = path / "latest"
    if latest.is_file() or (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        tag_dir = path / latest.read_text().strip() if latest.is_file() else path
        meta_file = tag_dir / "meta.json"
        if not (tag_dir / "model.safetensors").is_file():
            raise CheckpointError(f"checkpoint {tag_dir}: no model.safetensors (the module state); a ZeRO-3 "
                                  "checkpoint must be consolidated first with `ds zero-to-fp32`")
        aliases = {}
        if meta_file.is_file():
            aliases = json.loads(meta_file.read_text()).get("aliases", {}).get("model", {})
        source = SafetensorsDir(tag_dir, files=["model.safetensors"], aliases=aliases)
        return CheckpointInfo(source, None, None, "ds", f"ds checkpoint {tag_dir}")
    _refuse_pickles(path)
    config = read_hf_config(path) if (path / "config.json").is_file() else None
    return CheckpointInfo(SafetensorsDir(path), config, read_quant_scheme(path), "hf", f"checkpoint {path}")


def _listed(data: dict, base: Path, where: str) -> CheckpointInfo:
    files = data.get("checkpoints")
    if not files:
        raise CheckpointError(f"{where}: no 'checkpoints' list of safetensors files")
    files = [files] if isinstance(files, str) else list(files)
    bad = [f for f in files if not str(f).endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{where}: {bad[0]} is not a .safetensors file; ds never unpickles checkpoints")
    config = read_hf_config(base) if (base / "config.json").is_file() else None
    return CheckpointInfo(SafetensorsDir(base, files=files), config, read_quant_scheme(base), "list", where)
