"""``init_inference`` and the :class:`InferenceEngine` it returns.

Two ways to prepare a model, chosen by ``replace_with_kernel_inject`` (DeepSpeed's switch):

- **native** (``True``, or a model directory given instead of a module): the model is rebuilt as
  ds_infer's own implementation (:mod:`ds_infer.models`: fused projections, static KV cache,
  capturable decode step, fused norms through the op registry) from the module's weights or the
  checkpoint — on the meta device first, so with ``checkpoint=`` and tensor parallelism each rank
  reads only its slices. ``engine.module`` is that native model (``engine.module.generate(...)``
  works). Supported: Llama, Mistral, Qwen2/3, GPT-2, Mixtral, Qwen-MoE and ds' own GPT.
- **in place** (``False``, the default): ``engine.module`` is your model — a transformers model keeps
  its own ``.generate`` — cast to ``dtype``, its ``nn.Linear`` layers swapped for quantized ones when
  ``quant`` asks, weights loaded from ``checkpoint`` by their state-dict names.

``engine.generate(...)`` is ds_infer's decode loop (:mod:`ds_infer.generation`) on either.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ds_core.errors import ConfigError

from .checkpoints import open_checkpoint
from .config import InferenceConfig, parse_bytes, parse_config
from .models import CausalLM
from .models.build import (
    build_model,
    check_parallel,
    load_from_source,
    make_parallel,
    native_arch,
    resolve_dtype,
)
from .models.config import arch_from_hf
from .models.gpt2 import ds_gpt_names
from .models.sources import CheckpointError, RenamedSource
from .state import load_module_state

__all__ = ["init_inference", "InferenceEngine"]


def init_inference(model: nn.Module | str | Path, config: Any = None, **kwargs: Any) -> InferenceEngine:
    """Prepare ``model`` for inference with DeepSpeed's ``init_inference`` keys (see :mod:`ds_infer.config`).

    ``model`` may also be a ``save_pretrained`` directory (the native path). Every rank of a
    tensor-parallel group calls this with the same arguments.
    """
    return InferenceEngine(model, parse_config(config, **kwargs))


def _device(cfg: InferenceConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _dtype_and_quant(cfg: InferenceConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """The compute dtype and the quantization setting; int8 ``dtype`` means int8 weights."""
    dtype, quant = cfg.dtype, cfg.quant
    if dtype in (torch.int8, "int8", "torch.int8"):
        from .quant.factory import parse_quant

        spec = parse_quant(quant) if quant is not None else None
        if spec is not None and (spec.get("backend") != "ds" or spec.get("bits") != 8):
            raise ConfigError(f"dtype=torch.int8 asks for int8 weights but quant={quant!r} asks for something else; "
                              "give one of them (dtype=torch.int8, or quant=... with a float dtype)")
        return (torch.float16 if device.type == "cuda" else torch.float32), quant or "int8"
    if dtype == "int4":
        return (torch.float16 if device.type == "cuda" else torch.float32), quant or "int4"
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    if quant is not None:
        from .quant.factory import parse_quant

        spec = parse_quant(quant)
        if spec is not None and spec["backend"] == "bnb" and dtype == torch.float32 and spec["type"] == "int8" \
                and device.type == "cuda":
            raise ConfigError("bitsandbytes int8 (LLM.int8()) computes in float16 on CUDA; use dtype=torch.float16 "
                              "with quant={'backend': 'bnb', 'type': 'int8'}, or quant='int8'")
    return dtype, quant


class InferenceEngine:
    """``engine.module``: the ready model; ``engine(...)``: its forward; ``engine.generate(...)``."""

    def __init__(self, model: nn.Module | str | Path, config: InferenceConfig) -> None:
        self.config = cfg = config
        self.device = _device(cfg)
        self.dtype, quant = _dtype_and_quant(cfg, self.device)
        self.tp_size = cfg.tp_size()
        self.zero = cfg.zero.resolved()
        self.native = bool(cfg.replace_with_kernel_inject) or isinstance(model, (str, Path)) \
            or self.zero.offload != "none"
        self._decoder = None
        start = time.perf_counter()
        if self.native:
            self.module = self._build_native(model, quant)
        else:
            self.module = self._prepare_in_place(model, quant)
        self.load_seconds = time.perf_counter() - start

    # -- native ---------------------------------------------------------------------------------

    def _build_native(self, model: nn.Module | str | Path, quant: Any) -> CausalLM:
        cfg = self.config
        ckpt = open_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else None
        if isinstance(model, (str, Path)):
            if ckpt is not None:
                raise ConfigError("init_inference(model_dir, checkpoint=...): give the directory once")
            ckpt = open_checkpoint(model)
            model = None
        # the architecture: the checkpoint's config.json, else the module's own description
        found = native_arch(model) if model is not None else None
        if ckpt is not None and ckpt.hf_config is not None:
            arch = arch_from_hf(ckpt.hf_config)
        elif found is not None:
            arch = found[0]
        elif model is None:
            raise CheckpointError(f"{ckpt.where}: no config.json to build the model from")
        else:
            raise ConfigError(f"replace_with_kernel_inject=True: {type(model).__name__} has no native "
                              "implementation in ds_infer (Llama, Mistral, Qwen2/3, GPT-2, Mixtral, Qwen-MoE, "
                              "ds_core GPT); use replace_with_kernel_inject=False to run it as it is")
        check_parallel(arch, self.tp_size)  # before any weight is read
        if ckpt is not None:
            source = ckpt.source
            scheme, where = ckpt.quant_scheme, ckpt.where
            if arch.model_type == "ds_gpt":  # the module's own names -> the GPT-2 names the loader reads
                source = RenamedSource(source, ds_gpt_names)
                if scheme is not None:
                    modules = {ds_gpt_names(f"{k}.weight").removesuffix(".weight"): v
                               for k, v in scheme.get("modules", {}).items()}
                    scheme = dict(scheme, modules=modules)
        else:
            source, scheme, where = found[1], None, f"{type(model).__name__} state dict"
            if any(p.is_meta for p in model.parameters()):
                raise ConfigError(f"{type(model).__name__} is on the meta device and no checkpoint= was given; "
                                  "pass the checkpoint to load its weights from")
        dtype = self.dtype or _source_dtype(model, scheme, arch)
        group = cfg.tensor_parallel.tp_group
        moe = cfg.moe if not isinstance(cfg.moe, bool) else None
        ep = (moe.ep_size if moe is not None else 1) if cfg.ep_size is None else cfg.ep_size
        if ep not in (1, self.tp_size):
            raise ConfigError(f"moe ep_size {ep} must be 1 or the tensor-parallel size {self.tp_size}: experts are "
                              "spread over the tensor-parallel ranks")
        if ep > 1 and arch.moe is not None and arch.moe.num_experts % ep:
            raise ConfigError(f"moe ep_size {ep} does not divide the {arch.moe.num_experts} experts of "
                              f"{arch.model_type}; use ep_size 1 (each expert's hidden units split over the ranks)")
        # ep_size == tp: whole experts per rank; ep_size 1: every expert split like a dense MLP
        par = make_parallel(self.tp_size, group, expert_parallel=ep > 1)
        from .quant.factory import factory_for

        factory = factory_for(quant, checkpoint_quantized=scheme is not None)
        built = build_model(arch, par)
        streamer = None
        weights_device = self.device
        if self.zero.offload != "none":  # each layer leaves for its store as soon as it is read
            from .offload import make_streamer

            streamer = make_streamer(built, self.zero, self.device, parse_bytes(self.zero.memory_budget))
            weights_device = torch.device("cpu")
        native = load_from_source(built, source, dtype=dtype, device=weights_device, factory=factory,
                                  quant_scheme=scheme, where=where, on_layer=streamer.pack if streamer else None)
        if model is not None and hasattr(model, "generation_config"):
            native.generation_config = model.generation_config
        native.set_fused(bool(cfg.replace_with_kernel_inject))
        if streamer is not None:
            from .offload import offload_layers

            offload_layers(native, self.zero, self.device, parse_bytes(self.zero.memory_budget), streamer)
        return native

    # -- in place -------------------------------------------------------------------------------

    def _prepare_in_place(self, model: nn.Module, quant: Any) -> nn.Module:
        cfg = self.config
        if self.tp_size > 1:
            from .autotp import shard_in_place

            return shard_in_place(self, model, quant)
        if cfg.checkpoint is not None:
            ckpt = open_checkpoint(cfg.checkpoint)
            load_module_state(model, ckpt.source, ckpt.where, self.device)
        if self.dtype is not None:
            model.to(self.dtype)
        model.to(self.device)
        if quant is not None:
            from .quant.inplace import quantize_in_place

            quantize_in_place(model, quant)
        model.eval()
        return model

    # -- running --------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    @torch.inference_mode()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Native: ``(input_ids, attention_mask=None) -> logits [B, T, vocab]``; else the module's forward."""
        if isinstance(self.module, CausalLM):
            return self.module.score(*args, **kwargs)
        return self.module(*args, **kwargs)

    def decoder(self):
        if self._decoder is None and isinstance(self.module, CausalLM):
            from .decode import Decoder

            capture = None
            if self.config.enable_cuda_graph and self.device.type == "cuda":
                capture = "cuda_graph"
            elif self.config.compile:  # True on CPU with one rank: compiled ahead of time (ds_infer.aot)
                plain = (self.config.compile is True and self.device.type == "cpu" and self.module.par.size == 1
                         and self.zero.offload == "none")  # streamed layers swap their weights every step
                capture = "export" if plain else "compile"
            options = self.config.compile if isinstance(self.config.compile, dict) else None
            self._decoder = Decoder(self.module, capture=capture, compile_options=options)
        return self._decoder

    def generate(self, input_ids: Any, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """ds_infer's decode loop (see :func:`ds_infer.generate`); ``max_out_tokens`` bounds the length."""
        from .generation import generate

        if isinstance(input_ids, Mapping):  # a tokenizer's BatchEncoding
            kwargs.setdefault("attention_mask", input_ids.get("attention_mask"))
            input_ids = input_ids["input_ids"]
        if isinstance(input_ids, Tensor):
            input_ids = input_ids.to(self.device)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        return generate(self.module, input_ids, max_new_tokens=max_new_tokens, decoder=self.decoder(),
                        max_length_limit=self.config.max_out_tokens, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers this rank holds (packed codes count at their packed size)."""
        seen, total = set(), 0
        for t in [*self.module.parameters(), *self.module.buffers()]:
            if t.data_ptr() in seen or t.is_meta:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


def _source_dtype(model: nn.Module | None, scheme: dict | None, arch) -> torch.dtype:
    if scheme and scheme.get("dtype"):
        return resolve_dtype(scheme["dtype"])
    if model is not None:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if first is not None and not first.is_meta:
            return first.dtype
    if arch.torch_dtype:
        try:
            return resolve_dtype(arch.torch_dtype)
        except ConfigError:
            pass
    return torch.float32
