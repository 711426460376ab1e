"""Building native models: from a ``save_pretrained`` directory, a ``transformers`` model or our GPT.

Every path goes through the same steps: describe the architecture (:mod:`.config`), check the
tensor-parallel layout against it (errors before any file is opened), build the module on the meta
device, run the loader's shape check over the checkpoint, then read this rank's slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ds_core.errors import ConfigError

from .base import CausalLM
from .config import ArchConfig, arch_from_hf, read_hf_config
from .gpt2 import GPT2LMHeadModel, ds_gpt_names
from .layers import Parallel
from .llama import LlamaForCausalLM
from .loader import LinearFactory, WeightLoader
from .rope import Rotary
from .sources import CheckpointError, DictSource, RenamedSource, SafetensorsDir, TensorSource

__all__ = ["MODEL_CLASSES", "build_model", "check_parallel", "load_model", "load_from_source",
           "from_module", "make_parallel", "resolve_dtype", "read_quant_scheme", "native_arch"]

MODEL_CLASSES: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
QUANT_FILE = "ds_quant.json"


def resolve_dtype(dtype: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    """A compute dtype from a torch dtype or its name; an error naming the accepted ones."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"dtype {dtype!r} is not a compute dtype; use torch.float32, torch.bfloat16 or "
                      "torch.float16 (int8/int4 weights are asked for with quant=..., or dtype=torch.int8 "
                      "in init_inference)")


def make_parallel(tp: int | Parallel | None, group=None, expert_parallel: bool = True) -> Parallel:
    if isinstance(tp, Parallel):
        return tp
    size = int(tp or 1)
    if size < 1:
        raise ConfigError(f"tensor_parallel tp_size {size} must be >= 1")
    if size == 1:
        return Parallel()
    if not dist.is_initialized():
        raise ConfigError(f"tensor_parallel tp_size {size} needs torch.distributed initialised on {size} ranks; "
                          "start the script with `ds run --nproc N` (or torchrun) and call "
                          "ds_core.init_distributed() first")
    world = dist.get_world_size(group)
    if world != size:
        raise ConfigError(f"tensor_parallel tp_size {size} != {world} ranks in the process group; launch "
                          f"{size} ranks or pass a group of that size (mp_group=...)")
    return Parallel(dist.get_rank(group), size, group if group is not None else dist.group.WORLD, expert_parallel)


def check_parallel(arch: ArchConfig, tp: int) -> None:
    """Raise when ``arch`` cannot be split over ``tp`` ranks, naming the value, the rule and the fix."""
    if tp == 1:
        return
    good = [n for n in range(1, arch.num_heads + 1) if arch.num_heads % n == 0]
    if arch.num_heads % tp:
        raise ConfigError(f"tensor_parallel tp_size {tp} does not divide num_attention_heads {arch.num_heads} of "
                          f"{arch.model_type}; each rank must hold whole heads. Use tp_size in {good}")
    # grouped-query KV heads split when they divide tp and are replicated otherwise (ds-parallel's
    # KVHeads); either way the query heads of a rank must read whole KV heads
    kv = arch.num_kv_heads
    if arch.num_heads % kv:
        raise ConfigError(f"{arch.model_type}: num_key_value_heads {kv} does not divide num_attention_heads "
                          f"{arch.num_heads}; the config is inconsistent")
    dense_layers = arch.moe is None or not all(arch.moe.sparse_layers)
    if dense_layers and arch.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel tp_size {tp} does not divide intermediate_size "
                          f"{arch.intermediate_size}; choose a tp_size dividing it")
    if arch.moe is not None and arch.moe.num_experts % tp and arch.moe.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel tp_size {tp} divides neither num_experts {arch.moe.num_experts} "
                          f"(expert parallelism) nor the expert intermediate size {arch.moe.intermediate_size}")
    if arch.moe is not None and arch.moe.shared_intermediate_size % tp:
        raise ConfigError(f"tensor_parallel tp_size {tp} does not divide shared_expert_intermediate_size "
                          f"{arch.moe.shared_intermediate_size}")


def build_model(arch: ArchConfig, par: Parallel | None = None) -> CausalLM:
    """The module skeleton on the meta device (no memory)."""
    par = par or Parallel()
    check_parallel(arch, par.size)
    if arch.moe is not None and par.size > 1 and arch.moe.num_experts % par.size:
        par.expert_parallel = False  # experts split by intermediate size instead
    with torch.device("meta"):
        return MODEL_CLASSES[arch.family](arch, par)


def read_quant_scheme(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / QUANT_FILE
    if not path.is_file():
        return None
    scheme = json.loads(path.read_text())
    if scheme.get("format") != "ds-quant" or int(scheme.get("version", 0)) != 1:
        raise CheckpointError(f"{path}: format {scheme.get('format')!r} version {scheme.get('version')!r} is not "
                              "ds-quant version 1; see docs/quantized-format.md")
    for name, entry in scheme.get("modules", {}).items():
        bits = int(entry.get("bits", 0))
        if bits not in (1, 2, 4, 8):
            raise CheckpointError(f"{path}: module {name} has bits={bits}; ds-quant stores 1, 2, 4 or 8")
    return scheme


def load_from_source(model: CausalLM, source: TensorSource, *, dtype: torch.dtype, device: torch.device | str,
                     factory: LinearFactory | None = None, quant_scheme: dict | None = None,
                     where: str = "checkpoint") -> CausalLM:
    """Check then fill ``model`` (built by :func:`build_model`) from ``source``; returns it."""
    modules = (quant_scheme or {}).get("modules", {})
    activations = (quant_scheme or {}).get("activations")
    kwargs = dict(quant_modules=modules, activations=activations, where=where)
    model.load_weights(WeightLoader(model, source, dtype, torch.device("meta"), factory, check=True, **kwargs))
    model.load_weights(WeightLoader(model, source, dtype, torch.device(device), factory, **kwargs))
    return finalize(model, device)


def finalize(model: CausalLM, device: torch.device | str) -> CausalLM:
    if hasattr(model, "rotary"):
        model.rotary = Rotary(model.arch.rope, device=device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors {left[:8]} were not filled from the checkpoint (a loader bug or an "
                              "unsupported layout)")
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(model_dir: str | Path, dtype: Any = None, quant: Any = None, tp: int | Parallel | None = None,
               device: torch.device | str | None = None, factory: LinearFactory | None = None) -> CausalLM:
    """Load a ``save_pretrained`` (or ds-quant) directory into a native model on ``device``.

    ``dtype``: compute dtype (default: the checkpoint's, else fp32); ``quant``: quantize weights on
    load (``"int8"``, ``"int4"``, or a dict, see :mod:`ds_infer.quant`); ``tp``: tensor-parallel
    size over the default process group (or a :class:`Parallel`).
    """
    config = read_hf_config(model_dir)
    arch = arch_from_hf(config)
    scheme = read_quant_scheme(model_dir)
    stored = str((scheme or {}).get("dtype") or arch.torch_dtype or "float32").lower().removeprefix("torch.")
    dtype = resolve_dtype(dtype, _DTYPES.get(stored, torch.float32))
    par = make_parallel(tp)
    check_parallel(arch, par.size)
    if factory is None:
        from ..quant.factory import factory_for

        factory = factory_for(quant, checkpoint_quantized=scheme is not None)
    model = build_model(arch, par)
    device = torch.device(device or "cpu")
    return load_from_source(model, SafetensorsDir(model_dir), dtype=dtype, device=device, factory=factory,
                            quant_scheme=scheme, where=f"checkpoint {model_dir}")


def native_arch(module: nn.Module) -> tuple[ArchConfig, TensorSource] | None:
    """``(arch, source)`` when we have a native implementation of ``module``, else None."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "model_type"):
        try:
            arch = arch_from_hf(config)
        except ConfigError:
            return None
        return arch, DictSource(module.state_dict())
    cfg = getattr(module, "cfg", None)
    if type(module).__name__ == "GPT" and type(module).__module__ == "ds_core.testing.models" and cfg is not None:
        return ds_gpt_arch(cfg), RenamedSource(DictSource(module.state_dict()), ds_gpt_names)
    return None


def ds_gpt_arch(cfg: Any) -> ArchConfig:
    """The ``ds_core.testing.models.GPT`` config as a GPT-2 architecture (exact GELU, no bias-less parts)."""
    head_dim = cfg.dim // cfg.heads
    return ArchConfig(model_type="ds_gpt", family="gpt2", vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                      num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.heads, head_dim=head_dim,
                      intermediate_size=4 * cfg.dim, norm_eps=1e-5, act="gelu",
                      max_position_embeddings=cfg.seq_len, tie_word_embeddings=cfg.tie_embeddings,
                      qkv_bias=True, o_bias=True, mlp_bias=True, sliding_windows=(None,) * cfg.layers,
                      attn_scales=(head_dim**-0.5,) * cfg.layers)


def from_module(module: nn.Module, dtype: Any = None, quant: Any = None, tp: int | Parallel | None = None,
                device: torch.device | str | None = None, factory: LinearFactory | None = None,
                source: TensorSource | None = None) -> CausalLM | None:
    """A native copy of ``module`` (a transformers causal LM of a supported type, or our GPT), or None."""
    found = native_arch(module)
    if found is None:
        return None
    arch, own = found
    first = next(module.parameters(), None)
    default = first.dtype if first is not None and first.is_floating_point() else torch.float32
    dtype = resolve_dtype(dtype, default)
    par = make_parallel(tp)
    if factory is None:
        from ..quant.factory import factory_for

        factory = factory_for(quant)
    model = build_model(arch, par)
    device = torch.device(device or (first.device if first is not None else "cpu"))
    return load_from_source(model, source or own, dtype=dtype, device=device, factory=factory,
                            where=f"{type(module).__name__} state dict")
