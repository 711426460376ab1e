"""ZeRO-Inference: decoder-layer weights kept off the compute device and streamed in layer by layer.

DeepSpeed's ZeRO-Inference (Aminabadi et al. 2022, "DeepSpeed-Inference", §6) keeps a model's
weights in CPU memory or on NVMe and brings each layer to the accelerator just before it runs, so a
model larger than device memory generates. Here each decoder layer's tensors are packed into one
flat byte buffer:

- ``offload="cpu"``: the buffers stay in host memory (pinned when the compute device is a GPU) and
  are copied to a device slot before the layer runs (on a side CUDA stream, overlapped);
- ``offload="nvme"``: the buffers are written to ``nvme_path`` once and read back with the op
  registry's ``aio_pread`` (ds-ops' parallel, O_DIRECT-capable reader; plain ``os.preadv`` without it).

A pool of ``prefetch + 1`` slots holds the layer running and the ones being fetched ahead, in a
background thread, while it computes. ``memory_budget`` (bytes) caps what this process keeps of
the model's weights on CPU-only runs: the embeddings, head and final norm (always resident) plus
the slots; what remains of the budget keeps the first layers resident for good, and every other
layer is read from NVMe each step.

[Note: released layers] Outside its forward a streamed layer's tensors are empty placeholders, so
code that touches them without the fetch fails on a shape error instead of computing with stale
data.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ds_core.errors import ConfigError
from ds_core.ops import get_op

__all__ = ["LayerStreamer", "offload_layers", "decoder_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ConfigError(f"ZeRO-Inference streams decoder layers; {type(model).__name__} has no model.layers or "
                      "transformer.h")


@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class _Layer:
    entries: list[_Entry]
    nbytes: int
    host: Tensor | None = None  # uint8 flat copy (offload="cpu")
    path: str | None = None  # file (offload="nvme")
    resident: Tensor | None = None  # kept on the device for good (within the budget)
    slot: int | None = None
    ready: Future | None = None
    events: list[Any] = field(default_factory=list)


def _tensors(layer: nn.Module) -> list[tuple[nn.Module, str, Tensor, bool]]:
    out, seen = [], set()
    for module in layer.modules():
        for name, t in list(module._parameters.items()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((module, name, t, True))
        for name, t in list(module._buffers.items()):
            if t is not None and id(t) not in seen and name not in module._non_persistent_buffers_set:
                seen.add(id(t))
                out.append((module, name, t, False))
    return out


def _pread_default(dst: Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool) -> int:
    import ctypes

    view = memoryview((ctypes.c_char * dst.nbytes).from_address(dst.data_ptr())).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < dst.nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{path}: short read at byte {offset + done}")
            done += n
    finally:
        os.close(fd)
    return done


def _pwrite_default(src: Tensor, path: str, offset: int, block_size: int, workers: int, direct: bool,
                    fsync: bool) -> int:
    with open(path, "wb") as f:
        f.write(src.numpy().tobytes())
    return src.nbytes


class LayerStreamer:
    """Owns the layers' off-device copies, the device slots and the hooks that fetch and release."""

    def __init__(self, model: nn.Module, offload: str, device: torch.device, *, nvme_path: str | None = None,
                 pin_memory: bool = True, prefetch: int = 1, memory_budget: int | None = None) -> None:
        self.layers_module = decoder_layers(model)
        self.device, self.offload, self.prefetch = device, offload, max(0, prefetch)
        if offload == "cpu" and device.type == "cpu" and memory_budget is not None:
            raise ConfigError("zero.memory_budget with offload='cpu' on a CPU-only run: the weights already live in "
                              "host memory; use offload='nvme' (with nvme_path) to keep them on disk")
        if offload == "nvme" and not nvme_path:
            raise ConfigError("zero.offload='nvme' needs zero.nvme_path (a directory on a fast local disk)")
        self.dir = Path(nvme_path) if nvme_path else None
        self._pread = get_op("aio_pread", _pread_default)
        self._pwrite = get_op("aio_pwrite", _pwrite_default)
        pin = pin_memory and device.type == "cuda"
        layer_ids = {id(t) for layer in self.layers_module for _, _, t, _ in _tensors(layer)}
        self.other_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                               if id(t) not in layer_ids)
        self.layers: list[_Layer] = [self._pack(i, layer, pin) for i, layer in enumerate(self.layers_module)]
        self.slot_bytes = max(layer.nbytes for layer in self.layers)
        self.num_slots = min(len(self.layers), self.prefetch + 1)
        self.budget = memory_budget
        working = self.other_bytes + self.num_slots * self.slot_bytes
        if memory_budget is not None and memory_budget < working:
            raise ConfigError(
                f"zero.memory_budget {memory_budget:,} bytes is below the working set: {self.other_bytes:,} bytes of "
                f"embeddings/head/norm + {self.num_slots} layer slot(s) x {self.slot_bytes:,} bytes = {working:,}; "
                f"raise the budget or lower zero.prefetch")
        # within the budget, the first layers stay resident and are never fetched again
        spare = (memory_budget - working) if memory_budget is not None else 0
        if offload == "cpu" and device.type == "cpu":
            spare = float("inf")  # nothing to stream: host memory is the compute memory
        for layer in self.layers:
            if layer.nbytes > spare:
                break
            layer.resident = self._read_layer(layer, torch.empty(layer.nbytes, dtype=torch.uint8, device=device))
            spare -= layer.nbytes
            layer.host = None
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.num_slots)]
        self.staging = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(self.num_slots)] \
            if offload == "nvme" and device.type == "cuda" else None
        self._free = list(range(self.num_slots))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ds-infer-prefetch")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._lock = threading.Lock()
        self.fetches = 0
        self.peak_bytes = 0
        for i in range(len(self.layers)):
            self._release(i)
        for i, module in enumerate(self.layers_module):
            module.register_forward_pre_hook(self._pre_hook(i))
            module.register_forward_hook(self._post_hook(i))
        self._track()

    # -- packing -------------------------------------------------------------------------------

    def _pack(self, i: int, layer: nn.Module, pin: bool) -> _Layer:
        entries, offset = [], 0
        for module, name, t, is_param in _tensors(layer):
            nbytes = t.numel() * t.element_size()
            offset = -(-offset // 64) * 64  # aligned views for every dtype
            entries.append(_Entry(module, name, is_param, t.dtype, tuple(t.shape), offset, nbytes))
            offset += nbytes
        total = -(-offset // 4096) * 4096  # whole pages (O_DIRECT reads)
        flat = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        for e, (_, _, t, _) in zip(entries, _tensors(layer)):
            flat[e.offset:e.offset + e.nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8).cpu())
        rec = _Layer(entries, total)
        if self.offload == "nvme":
            self.dir.mkdir(parents=True, exist_ok=True)
            rec.path = str(self.dir / f"layer_{i:04d}.bin")
            self._pwrite(flat, rec.path, 0, 1 << 20, 4, False, False)
        else:
            rec.host = flat
        return rec

    def _read_layer(self, layer: _Layer, dst: Tensor) -> Tensor:
        if layer.host is not None:
            dst[: layer.nbytes].copy_(layer.host, non_blocking=True)
        elif self.device.type == "cpu":
            self._pread(dst[: layer.nbytes], layer.path, 0, 1 << 20, 4, True)
        else:
            stage = torch.empty(layer.nbytes, dtype=torch.uint8, pin_memory=True)
            self._pread(stage, layer.path, 0, 1 << 20, 4, True)
            dst[: layer.nbytes].copy_(stage, non_blocking=True)
        return dst

    # -- fetch / bind / release ----------------------------------------------------------------

    def _bind(self, i: int, buf: Tensor) -> None:
        for e in self.layers[i].entries:
            view = buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
            if e.is_param:
                e.module._parameters[e.name].data = view
            else:
                e.module._buffers[e.name] = view

    def _release(self, i: int) -> None:
        for e in self.layers[i].entries:
            empty = torch.empty(0, dtype=e.dtype, device=self.device)
            if e.is_param:
                e.module._parameters[e.name].data = empty
            else:
                e.module._buffers[e.name] = empty

    def _fetch(self, i: int) -> bool:
        """Start reading layer ``i`` into a free slot; False when it needs none or none is free."""
        layer = self.layers[i]
        if layer.resident is not None or layer.ready is not None:
            return False
        with self._lock:
            if not self._free:
                return False
            slot = self._free.pop(0)
        layer.slot = slot
        dst = self.slots[slot]

        def work() -> None:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    if layer.path is not None:
                        stage = self.staging[slot]
                        self._pread(stage[: layer.nbytes], layer.path, 0, 1 << 20, 4, True)
                        dst[: layer.nbytes].copy_(stage[: layer.nbytes], non_blocking=True)
                    else:
                        dst[: layer.nbytes].copy_(layer.host, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    layer.events = [event]
            else:
                self._read_layer(layer, dst)
            self.fetches += 1

        layer.ready = self._pool.submit(work)
        return True

    def _pre_hook(self, i: int):
        def hook(module, args):
            layer = self.layers[i]
            if layer.resident is not None:
                self._bind(i, layer.resident)
            else:
                if layer.ready is None and not self._fetch(i):
                    raise RuntimeError(f"ZeRO-Inference: no free slot for layer {i} (slots leaked)")
                layer.ready.result()
                for event in layer.events:
                    torch.cuda.current_stream().wait_event(event)
                self._bind(i, self.slots[layer.slot])
            # read the next layers while this one computes (cyclically: the next step starts at 0)
            n = len(self.layers)
            for k in range(1, self.prefetch + 1):
                self._fetch((i + k) % n)
            self._track()
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            layer = self.layers[i]
            if layer.resident is None:
                self._release(i)
                with self._lock:
                    self._free.append(layer.slot)
                layer.slot, layer.ready, layer.events = None, None, []
            return output
        return hook

    def _track(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes())

    def resident_bytes(self) -> int:
        """Bytes of model weights this process holds now: non-layer weights, slots, resident layers."""
        layers = sum(layer.nbytes for layer in self.layers if layer.resident is not None)
        host = sum(layer.host.numel() for layer in self.layers if layer.host is not None)
        return self.other_bytes + layers + self.num_slots * self.slot_bytes + host

    def total_bytes(self) -> int:
        return self.other_bytes + sum(layer.nbytes for layer in self.layers)


def offload_layers(model: nn.Module, config: Any, device: torch.device, memory_budget: int | None) -> LayerStreamer:
    """Stream ``model``'s decoder layers (``config``: ``ZeroInferenceConfig``); returns the streamer."""
    streamer = LayerStreamer(model, config.offload, device, nvme_path=config.nvme_path,
                             pin_memory=config.pin_memory, prefetch=config.prefetch, memory_budget=memory_budget)
    model.offload = streamer
    non_layer = {id(t) for layer in streamer.layers_module for _, _, t, _ in _tensors(layer)}
    for t in [*model.parameters(), *model.buffers()]:  # embeddings, norm, head go to the device
        if id(t) not in non_layer and t.device != device:
            t.data = t.data.to(device)
    return streamer
