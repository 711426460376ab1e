"""NVMe parameter offload for stage 3: each shard lives in a file and in memory only around its use.

ZeRO-Infinity (Rajbhandari et al. 2021, section 5.1) keeps the partitioned parameters on NVMe and
brings a shard in just before the all-gather that needs it. :class:`ShardSwapper` does that for the
:class:`~ds_zero.stage3.ShardedParameter` objects of one engine:

- one swap file per parameter group, laid out like the group's flat shards (``Stage3Group.offsets``),
  so the optimizer writes updated weights of any element range in place (``write_range``);
- ``load(s)`` returns the shard in memory, waiting for a prefetch in flight or reading it now;
  ``prefetch(s)`` starts the read and returns (a hint: skipped when every buffer is busy reading);
- at most ``buffer_count`` shards are in memory, each at most ``buffer_size`` elements; the least
  recently used one is dropped to make room. A shard changed in memory (detected by the tensor's
  version counter: ``GatheredParameters`` with a modifier rank, loading 16-bit weights) is written
  back and the write confirmed before its memory is dropped.

Shards change only at the optimizer step: :meth:`drop_all` runs first (writing back changes and
dropping every in-memory copy, which the step makes stale), then the step writes the new weights
and waits for them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ds_core.errors import ConfigError

from .swap import SwapStore, wait_all

__all__ = ["ShardSwapper"]


class ShardSwapper:
    """The NVMe side of stage-3 shards: files per group, a bounded set in memory; see the module docstring."""

    def __init__(self, store: SwapStore, buffer_count: int, buffer_size: int, pin: bool = False) -> None:
        self.store = store
        self.count, self.buffer_size, self.pin = max(1, buffer_count), buffer_size, pin
        self.resident: OrderedDict[int, object] = OrderedDict()  # id(shard) -> ShardedParameter, LRU first
        self.lock = threading.RLock()
        self.groups = 0

    def add_group(self, numel: int, dtype: torch.dtype) -> str:
        """Create the swap file of one parameter group's ``numel`` shard elements; returns its name."""
        name = f"g{self.groups}"
        self.groups += 1
        self.store.create(name, numel, dtype)
        return name

    def check(self, s) -> None:
        if s.part > self.buffer_size:
            raise ConfigError(f"offload_param.buffer_size {self.buffer_size} is smaller than the shard of parameter "
                              f"{s.name} ({s.part} elements per rank); every shard must fit in one buffer: set "
                              f"offload_param.buffer_size to at least {s.part}")

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin)

    # -- moving shards ---------------------------------------------------------------------------------
    def write_out(self, s):
        """Start writing ``s``'s in-memory shard to its file; returns the handle."""
        return self.store.write(s.swap_file, s._data, s.swap_offset)

    def load(self, s) -> torch.Tensor:
        """``s``'s shard in memory: a finished prefetch, or read now."""
        with self.lock:
            if s._read is not None:
                handle, s._read = s._read, None
                try:
                    handle.wait()
                except Exception:
                    self.resident.pop(id(s), None)
                    s._data = None
                    raise
                s._clean = s._data._version
            elif s._data is None:
                self._make_room(s, for_prefetch=False)
                buf = self.alloc(s.part, s.dtype)
                self.store.read(s.swap_file, buf, s.swap_offset).wait()
                s._data, s._clean = buf, buf._version
            self.resident[id(s)] = s
            self.resident.move_to_end(id(s))
            return s._data

    def prefetch(self, s) -> None:
        """Start reading ``s``'s shard unless it is in memory or on its way (or no buffer is free)."""
        with self.lock:
            if s._data is not None or s._read is not None:
                return
            if not self._make_room(s, for_prefetch=True):
                return
            buf = self.alloc(s.part, s.dtype)
            s._data = buf
            s._read = self.store.read(s.swap_file, buf, s.swap_offset)
            self.resident[id(s)] = s

    def _make_room(self, keep, for_prefetch: bool) -> bool:
        while len(self.resident) >= self.count:
            victims = [v for v in self.resident.values() if v is not keep and not (for_prefetch and v._read)]
            if not victims:
                return False
            self.evict(victims[0])
        return True

    def evict(self, s) -> None:
        """Drop ``s``'s in-memory shard, first finishing its read and writing back any change."""
        with self.lock:
            if s._read is not None:
                handle, s._read = s._read, None
                try:
                    handle.wait()
                finally:
                    s._data = None
                    self.resident.pop(id(s), None)
                return
            if s._data is not None and s._data._version != s._clean:
                self.write_out(s).wait()  # raises with the file named; the shard stays in memory then
            s._data = None
            self.resident.pop(id(s), None)

    def flush(self, shards) -> None:
        """Write back in-memory changes of ``shards`` (they stay in memory, now clean)."""
        with self.lock:
            dirty = [s for s in shards if s._read is None and s._data is not None and s._data._version != s._clean]
            wait_all([self.write_out(s) for s in dirty])
            for s in dirty:
                s._clean = s._data._version

    def drop_all(self) -> None:
        """Before the optimizer writes new weights: write back changes and drop every in-memory shard."""
        with self.lock:
            shards = list(self.resident.values())
            self.flush(shards)
            for s in shards:
                self.evict(s)

    # -- whole groups (the optimizer, checkpoints) --------------------------------------------------------
    def read_range(self, name: str, out: torch.Tensor, lo: int = 0):
        return self.store.read(name, out, lo)

    def write_range(self, name: str, values: torch.Tensor, lo: int = 0):
        return self.store.write(name, values, lo)

    def close(self) -> None:
        with self.lock:
            for s in list(self.resident.values()):
                s._data, s._read = None, None
            self.resident.clear()
        self.store.close()
