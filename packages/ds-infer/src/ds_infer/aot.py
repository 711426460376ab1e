"""The static decode step compiled ahead of time: ``torch.export`` + AOTInductor, called without guards.

[Note: ahead-of-time step] ``torch.compile`` re-checks its guards on every call: the type and
shape of every weight, cache tensor and module attribute the step reads. On CPU at batch 1 that
check, with the bytecode that gathers the graph's inputs, was ~0.3-0.9 ms of a ~9 ms step on the
measured machine. Here the step is exported once per (batch, cache length, span) with
``torch.export`` (non-strict), compiled by AOTInductor into a shared library, and each call hands
that library its inputs as one flat list: no guards, no Python between kernels.

What replaces the guards:

- The step's *inputs* are everything that changes between calls or generations: the tokens, their
  positions, the write slot, the cache's keys/values and padding mask, and the rotary tables. The
  library keeps references to none of them: the decoder passes the live tensors every call.
- The step's *constants* are the model's parameters and buffers, handed to the library by
  reference (``user_managed``): in-place changes to a weight are seen at once, and the library
  holds no copy. :meth:`ExportedStep.current` checks that every parameter is still the same tensor
  over the same memory, reached through the same submodules, and that no module has gained a
  forward hook (one Python loop, well under a millisecond); the decoder calls it at each prefill,
  and drops the library when it fails (``load_state_dict(assign=True)``, ``module.to(...)``, a
  replaced layer), so a stale weight is never computed with.
- A tensor the export would bake in as a constant that is neither a parameter nor a buffer (state
  the step reads from a plain attribute), or a module with forward hooks (which may swap weights
  per call, as ZeRO-Inference's streaming does), is refused (:class:`NotExportable`), and the
  decoder falls back to ``torch.compile``: baked in, that state would silently go stale.

Everything else the step depends on (the model's structure and config, batch, cache length, span)
fixes the shapes the library was compiled for; the decoder builds one library per (cache, span)
and drops them all with the cache.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .models.base import CausalLM
    from .models.kv import StaticKVCache

__all__ = ["ExportedStep", "NotExportable", "static_step"]


class NotExportable(RuntimeError):
    """The step reads state the exported library would freeze; use ``torch.compile`` instead."""


def static_step(model: CausalLM, cache: StaticKVCache, tokens: Tensor, positions: Tensor, offset: Tensor,
                span: int | None) -> Tensor:
    """Logits ``[B, V]`` of one static decode step (see :meth:`StaticKVCache.begin_static`)."""
    cache.begin_static(offset, span)
    hidden = model(tokens[:, None], positions[:, None], cache)
    return model.compute_logits(hidden)


def _hooked(root: nn.Module) -> list[str]:
    """Modules with forward hooks: a hook may swap weights per call (ZeRO-Inference streaming), or
    expect to run, and the library would do neither."""
    return [name or "the model" for name, m in root.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def _state(model: CausalLM, cache: StaticKVCache) -> list[Tensor]:
    """The per-call tensors, in the library's input order after (tokens, positions, offset)."""
    rotary = getattr(model, "rotary", None)
    table = list(rotary._table) if rotary is not None and rotary._table is not None else []
    return [cache.valid, *table, *cache.k, *cache.v]


class _Traced(nn.Module):
    """What is exported: the step with its per-call state as explicit inputs. ``forward`` runs only
    while exporting; it points a copy of the cache (and the rotary tables) at the traced inputs."""

    def __init__(self, model: CausalLM, cache: StaticKVCache, span: int | None) -> None:
        super().__init__()
        self.model = model
        self._cache, self._span = cache, span

    def forward(self, tokens: Tensor, positions: Tensor, offset: Tensor, state: list[Tensor]) -> Tensor:
        n = len(self._cache.k)
        valid, table, k, v = state[0], state[1:-2 * n], state[-2 * n:-n], state[-n:]
        view = copy.copy(self._cache)
        view.valid, view.k, view.v, view._masks = valid, list(k), list(v), {}
        rotary = getattr(self.model, "rotary", None)
        saved = rotary._table if rotary is not None else None
        if table:
            rotary._table = (table[0], table[1])
        try:
            return static_step(self.model, view, tokens, positions, offset, self._span)
        finally:
            if rotary is not None:
                rotary._table = saved


class ExportedStep:
    """One static decode step for one (cache, span), compiled by AOTInductor (see the module note).

    ``step(tokens, positions, offset)`` returns the logits and writes the cache in place, like the
    ``torch.compile``d step. Building it costs more than ``torch.compile``'s first call (small preset:
    28 s against 18-21 s) and is not cached across processes."""

    def __init__(self, model: CausalLM, cache: StaticKVCache, span: int | None) -> None:
        from torch._inductor import aoti_compile_and_package, aoti_load_package

        hooked = _hooked(model)
        if hooked:
            raise NotExportable(f"modules with forward hooks: {', '.join(hooked[:4])}")
        traced = _Traced(model, cache, span)
        b = cache.batch
        device = cache.valid.device
        example = (torch.zeros(b, dtype=torch.long, device=device), torch.zeros(b, dtype=torch.long, device=device),
                   torch.tensor(0, device=device))
        state = _state(model, cache)
        with torch.inference_mode(False), torch.no_grad():
            # example copies: the live tensors may be inference tensors, which export can't mutate
            program = torch.export.export(traced, (*example, [t.clone() for t in state]), strict=False)
        buffers = dict(traced.named_buffers(remove_duplicate=False))
        frozen = [name for name in program.constants if name not in buffers]
        if frozen:
            raise NotExportable(f"the decode step reads tensors that are neither parameters nor buffers "
                                f"({', '.join(frozen)}); an exported step would freeze them")
        mutated = set(program.graph_signature.buffers_to_mutate.values())
        if mutated:
            raise NotExportable(f"the decode step writes the buffers {sorted(mutated)}")
        with tempfile.TemporaryDirectory(prefix="ds_infer_step_") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch's own pytree use
            path = aoti_compile_and_package(program, package_path=os.path.join(tmp, "step.pt2"),
                                            inductor_configs={"aot_inductor.package_constants_in_so": False})
            library = aoti_load_package(path)
        owned = dict(traced.named_parameters(remove_duplicate=False))  # tied weights: every name
        owned.update(buffers)
        names = library.get_constant_fqns()
        missing = [n for n in names if n not in owned]
        if missing:
            raise NotExportable(f"the compiled step wants constants the model doesn't hold: {missing}")
        self._root = traced
        self._constants = [(*n.rpartition(".")[::2], owned[n], owned[n].data_ptr()) for n in names]
        library.load_constants({n: owned[n] for n in names}, check_full_update=True, user_managed=True)
        self._library = library  # keeps the loader (and the extracted shared library) alive
        self._run = library.loader.boxed_run
        self._state = state
        self._batch = b

    def current(self) -> bool:
        """True while every constant is still the model's tensor, over the same memory, reached
        through the same path (a replaced submodule counts), and no module has gained a hook."""
        root = self._root
        if _hooked(root):
            return False
        for path, attr, tensor, ptr in self._constants:
            try:
                module = root.get_submodule(path) if path else root
            except AttributeError:
                return False
            live = module._parameters.get(attr)
            if live is None:
                live = module._buffers.get(attr)
            if live is not tensor or live.data_ptr() != ptr:
                return False
        return True

    def __call__(self, tokens: Tensor, positions: Tensor, offset: Tensor) -> Tensor:
        if tokens.shape != (self._batch,) or positions.shape != (self._batch,):  # the library checks nothing
            raise ValueError(f"exported decode step for batch {self._batch} got tokens {tuple(tokens.shape)} "
                             f"and positions {tuple(positions.shape)}")
        args: list[Any] = [tokens.long().contiguous(), positions.long().contiguous(), offset, *self._state]
        return self._run(args)[0]
