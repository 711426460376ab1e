"""Tensor-parallel inference of a model as it is (``replace_with_kernel_inject=False``): AutoTP.

The model keeps its class and forward; ds-parallel's plan (the model's own ``tp_plan`` or its
structure) replaces its attention and MLP linears with column/row-parallel ones and its embedding
with a vocabulary-parallel one (``ds_parallel.tensor_parallel``, DeepSpeed's AutoTP). With
``checkpoint=`` and a model built on the meta device, each rank reads only its slices
(``ds_parallel.load_sharded``). A transformers model keeps its own ``.generate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ds_core.errors import ConfigError

if TYPE_CHECKING:
    from .engine import InferenceEngine

__all__ = ["shard_in_place"]


def shard_in_place(engine: InferenceEngine, model: nn.Module, quant: Any) -> nn.Module:
    import ds_parallel

    cfg = engine.config
    if quant is not None:
        raise ConfigError("quant=... with tensor_parallel and replace_with_kernel_inject=False is not supported: "
                          "the tensor-parallel layers hold dense weights. Use replace_with_kernel_inject=True "
                          "(the native model quantizes each rank's shard)")
    meta = any(p.is_meta for p in model.parameters())
    if meta and cfg.checkpoint is None:
        raise ConfigError(f"{type(model).__name__} is on the meta device and no checkpoint= was given; pass the "
                          "checkpoint directory to load each rank's slices from")
    if cfg.checkpoint is not None and not meta:
        from .checkpoints import open_checkpoint
        from .state import load_module_state

        ckpt = open_checkpoint(cfg.checkpoint)
        load_module_state(model, ckpt.source, ckpt.where, engine.device)
    model = ds_parallel.tensor_parallel(model, engine.tp_size, cfg.tensor_parallel.tp_group, broadcast=not meta)
    if meta:
        path = cfg.checkpoint if isinstance(cfg.checkpoint, (str,)) or hasattr(cfg.checkpoint, "__fspath__") else None
        if path is None:
            raise ConfigError("tensor_parallel with a meta-device model reads a save_pretrained directory; pass "
                              "checkpoint='path/to/dir'")
        ds_parallel.load_sharded(model, path, dtype=engine.dtype, device=engine.device)
    if engine.dtype is not None:
        model.to(engine.dtype)
    model.to(engine.device)
    return model.eval()
