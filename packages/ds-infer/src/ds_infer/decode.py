"""The fast decode path of a native model: a static KV cache and a step that can be captured.

:class:`Decoder` owns one :class:`~ds_infer.models.StaticKVCache` per (batch, length) and runs

- ``prefill(input_ids, attention_mask)``: the whole (left-padded) prompt in one forward, logits of
  each row's last token;
- ``step(tokens)``: one token per row. Eager, it attends over the filled part of the cache. With
  ``capture="compile"`` (``torch.compile``; CPU or GPU) or ``capture="cuda_graph"`` it runs the
  *static* step instead: the write slot is a device tensor and attention covers the whole buffer
  under a mask, so every step has the same shapes and no host synchronisation (gpt-fast's recipe).
  Compiled, the step attends over the first power-of-two number of slots past the write position
  (64, 128, ... up to the buffer; one graph each, see ``StaticKVCache.static_span``); a CUDA graph
  covers the whole buffer.

[Note: cache reuse] The cache is allocated for ``max_len`` rounded up to a multiple of 256 and kept
between calls with the same batch size, so repeated ``generate`` calls neither reallocate nor
recompile; a compiled step is specialised to one (batch, max_len, span) and rebuilt when they
change.

[Note: C++ wrapper on CPU] A compiled step's generated code is a wrapper that calls inductor's
kernels and the extern ones (GEMMs, attention) in turn. By default that wrapper is Python: at batch
1 on CPU, where each call is short, its per-call cost was ~7% of a step on the measured machine.
On CPU with one rank, and when ``compile_options`` set neither ``options`` nor ``mode`` nor another
backend, the step is compiled with inductor's ``cpp_wrapper`` (the wrapper in C++; the first
compile of a span takes a few seconds longer). Tensor-parallel steps keep the Python wrapper.

``capture="export"`` (CPU, one rank; what ``init_inference(compile=True)`` picks there) compiles the
same static step ahead of time with AOTInductor and calls it without ``torch.compile``'s guards
(:mod:`ds_infer.aot`, [Note: ahead-of-time step]). A step that can't be exported that way falls
back to ``torch.compile`` with the C++ wrapper, with a warning that says why.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .aot import ExportedStep, static_step
from .models.kv import StaticKVCache

if TYPE_CHECKING:
    from .models.base import CausalLM

__all__ = ["Decoder", "CAPTURE_MODES"]

CAPTURE_MODES = (None, "compile", "export", "cuda_graph")
_ROUND = 256


class Decoder:
    def __init__(self, model: CausalLM, capture: str | None = None, compile_options: dict[str, Any] | None = None,
                 cache_dtype: torch.dtype | None = None) -> None:
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture {capture!r} must be one of {CAPTURE_MODES}")
        if capture == "cuda_graph" and model.device.type != "cuda":
            raise ValueError("capture='cuda_graph' needs the model on a CUDA device; use capture='compile' on CPU")
        if capture == "export" and (model.device.type != "cpu" or model.par.size != 1):
            raise ValueError(f"capture='export' runs on CPU with one rank (this model: {model.device.type}, "
                             f"{model.par.size} ranks); use capture='compile'")
        rope = getattr(model.arch, "rope", None)
        if capture and rope is not None and rope.type in ("dynamic", "longrope"):
            capture = None  # these scalings read the longest position on the host every step
        self.model, self.capture = model, capture
        if model.device.type == "cpu":  # faster few-row GEMMs: ds-ops' kernel when fused, else the BLAS layout
            fused = any(getattr(m, "fused", False) for m in model.modules())
            if not (fused and model.use_rows_kernel()):
                model.store_weights_transposed()
        self.compile_options = dict(compile_options or {})
        if (capture in ("compile", "export") and model.device.type == "cpu" and model.par.size == 1
                and self.compile_options.get("backend", "inductor") == "inductor"
                and not {"options", "mode"} & self.compile_options.keys()):
            self.compile_options["options"] = {"cpp_wrapper": True}  # see [Note: C++ wrapper on CPU]
        self.cache_dtype = cache_dtype
        self.cache: StaticKVCache | None = None
        self._step_fn = None
        self._exported: dict[int | None, ExportedStep] = {}
        self.export_failure: str | None = None  # why capture="export" fell back to torch.compile
        self._graph: dict[str, Any] | None = None
        self.positions: Tensor | None = None

    # -- cache ---------------------------------------------------------------------------------

    def ensure_cache(self, batch: int, max_len: int) -> StaticKVCache:
        size = -(-max_len // _ROUND) * _ROUND
        limit = getattr(self.model.arch, "max_position_embeddings", None)
        if self.model.arch.rope is None and limit:  # learned positions: never beyond the table
            size = min(size, max(limit, max_len))
        c = self.cache
        if c is None or c.batch != batch or c.max_len < max_len:
            self.cache = StaticKVCache(self.model.kv_spec(self.cache_dtype), batch, size)
            self._step_fn, self._graph, self._exported = None, None, {}
        rotary = getattr(self.model, "rotary", None)
        if rotary is not None:  # cos/sin tables for every position this cache can hold
            rotary.reserve(self.cache.max_len, self.model.dtype)
        return self.cache

    # -- prefill and decode --------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> Tensor:
        b, p = input_ids.shape
        cache = self.ensure_cache(b, p + max_new_tokens)
        cache.reset(attention_mask)
        if self._exported and not all(step.current() for step in self._exported.values()):
            self._exported = {}  # a weight was replaced since they were built: rebuild, never run stale
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        else:
            positions = torch.arange(p, device=input_ids.device).expand(b, p)
        cache.begin(p)
        hidden = self.model(input_ids, positions, cache)
        cache.end()
        self.positions = positions[:, -1] + 1
        rows = torch.arange(b, device=input_ids.device) * p + (p - 1)
        return self.model.compute_logits(hidden, rows)

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, V]`` after feeding ``tokens [B]`` at each row's next position."""
        cache = self.cache
        positions = self.positions
        if self.capture is None:
            cache.begin(1)
            hidden = self.model(tokens[:, None], positions[:, None], cache)
            cache.end()
            logits = self.model.compute_logits(hidden)
        elif self.capture == "compile":
            if self._step_fn is None:
                self._step_fn = torch.compile(self._static_step, dynamic=False, **self.compile_options)
            offset = torch.tensor(cache.offset, device=tokens.device)
            logits = self._step_fn(tokens, positions, offset, cache.static_span(cache.offset))
            cache.offset += 1
        elif self.capture == "export":
            span = cache.static_span(cache.offset)
            step = self._exported.get(span) or self._export(span)
            if step is None:
                return self.step(tokens)  # fell back to torch.compile
            logits = step(tokens, positions, torch.tensor(cache.offset, device=tokens.device))
            cache.offset += 1
        else:
            logits = self._graph_step(tokens, positions)
            cache.offset += 1
        self.positions = positions + 1
        return logits

    def _static_step(self, tokens: Tensor, positions: Tensor, offset: Tensor, span: int | None = None) -> Tensor:
        return static_step(self.model, self.cache, tokens, positions, offset, span)

    def _export(self, span: int) -> ExportedStep | None:
        try:
            step = self._exported[span] = ExportedStep(self.model, self.cache, span)
        except Exception as e:  # noqa: BLE001 - any export/compile failure: torch.compile still captures it
            self.export_failure = f"{type(e).__name__}: {e}"
            warnings.warn(f"ds_infer: the decode step could not be compiled ahead of time ({self.export_failure}); "
                          f"using torch.compile", stacklevel=3)
            self.capture, self._exported = "compile", {}
            return None
        return step

    def _graph_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        g = self._graph
        if g is None:
            g = self._graph = {"tokens": tokens.clone(), "positions": positions.clone(),
                               "offset": torch.tensor(self.cache.offset, device=tokens.device)}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            saved = [t.clone() for t in (*self.cache.k, *self.cache.v)]
            with torch.cuda.stream(stream):  # warm up outside the graph (allocator, lazy inits)
                for _ in range(2):
                    self._static_step(g["tokens"], g["positions"], g["offset"])
            torch.cuda.current_stream().wait_stream(stream)
            for t, s in zip((*self.cache.k, *self.cache.v), saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g["logits"] = self._static_step(g["tokens"], g["positions"], g["offset"])
            g["graph"] = graph
        g["tokens"].copy_(tokens)
        g["positions"].copy_(positions)
        g["offset"].fill_(self.cache.offset)
        g["graph"].replay()
        return g["logits"].clone()
