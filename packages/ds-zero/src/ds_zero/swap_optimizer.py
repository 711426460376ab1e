"""NVMe optimizer offload: fp32 masters and optimizer state on NVMe, stepped in sub-groups.

ZeRO-Infinity (Rajbhandari et al. 2021, section 5.2) keeps the fp32 master weights and optimizer
state on NVMe and streams them through host memory: each parameter group's partition is cut into
sub-groups ("chunks", DeepSpeed's ``sub_group_size``) and, while chunk k is stepped, chunk k+1 is
read and chunk k-1 written. Here a chunk's master and its state tensors lie end to end in one
staging buffer, so a chunk is at most ``buffer_size / (1 + K)`` elements (K: the optimizer's state
tensors per element, 2 for Adam) and ``buffer_count`` buffers bound the host memory. A buffer is
reused only after the write from it has been confirmed.

The optimizer is an ordinary ``torch.optim`` optimizer (ds-core's ``build_optimizer``, or the
client's) over one parameter per chunk; stepping chunk k means pointing that parameter, its gradient
and its state at the staging buffer and calling ``step()`` with every other chunk's gradient unset,
so torch skips them. Elementwise optimizers (Adam, AdamW, SGD, Adagrad, Lion) thus compute exactly
what the whole-partition step of CPU offload computes; Lamb's trust ratio becomes per chunk.

Between steps only scalar state (``step``) stays in memory. For checkpoints the class keeps the
layout of CPU offload: ``masters[g]`` reads group g's masters into memory on demand (and writes them
back before the next step if they were changed), and the optimizer's ``state_dict`` /
``load_state_dict`` speak one entry per group, so checkpoints move freely between CPU and NVMe
offload.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds_core.errors import ConfigError, DSError

from .swap import SwapStore, wait_all

__all__ = ["SwappedOptimizerState", "probe_state_keys"]


def probe_state_keys(make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
                     hyper: dict) -> tuple[list[str], dict[str, float]]:
    """The per-element state tensors the optimizer keeps (e.g. ``["exp_avg", "exp_avg_sq"]``), found by
    stepping a throw-away 8-element copy of it once, and the constant each one starts at when the
    optimizer creates it at construction rather than at its first step (Adagrad's ``sum``)."""
    p = torch.nn.Parameter(torch.ones(8))
    p.grad = torch.full((8,), 1e-3)
    try:
        probe = make_optimizer([{**hyper, "params": [p]}])
        eager = {k: v.clone() for k, v in probe.state[p].items() if isinstance(v, torch.Tensor)}
        probe.step()
    except Exception as exc:
        raise ConfigError(f"offload_optimizer.device 'nvme' steps the optimizer in sub-groups and could not "
                          f"probe its state on a small tensor ({type(exc).__name__}: {exc}); use device 'cpu' "
                          f"with this optimizer") from exc
    keys, fills = [], {}
    for key, value in sorted(probe.state[p].items()):
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            if value.dtype != torch.float32:
                raise ConfigError(f"optimizer state {key!r} is {value.dtype}; NVMe offload swaps fp32 state "
                                  f"only; use offload_optimizer.device 'cpu' with this optimizer")
            keys.append(key)
            start = eager.get(key)
            if start is not None:
                if start.shape != p.shape or not bool((start == start[0]).all()):
                    raise ConfigError(f"optimizer state {key!r} starts non-uniform; NVMe offload cannot "
                                      f"initialise it per sub-group; use offload_optimizer.device 'cpu'")
                fills[key] = float(start[0])
    return keys, fills


class _Chunk:
    __slots__ = ("group", "lo", "hi", "offset", "param", "ready", "scalars")

    def __init__(self, group: int, lo: int, hi: int, offset: int) -> None:
        self.group, self.lo, self.hi, self.offset = group, lo, hi, offset
        self.param = torch.nn.Parameter(torch.empty(0))  # points at a staging buffer only while stepped
        self.ready = False  # state written once (after the first step or a load)
        self.scalars: dict = {}


class _Masters:
    """``masters[g]``: group g's fp32 masters read into memory on demand (checkpoints, inspection);
    kept until :meth:`SwappedOptimizerState.flush_masters` writes back any change and drops them."""

    def __init__(self, owner: SwappedOptimizerState) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.numels)

    def __getitem__(self, g: int) -> torch.Tensor:
        return self.owner.master(g)

    def __iter__(self):
        return (self.owner.master(g) for g in range(len(self)))


class SwappedOptimizerState:
    """Masters and optimizer state of every group in ``store``, stepped chunk by chunk; see the module docstring.

    ``numels``: each group's partition size; ``keys``, ``fills``: per-element state names and the start
    value of those the optimizer creates at construction (:func:`probe_state_keys`); ``chunk_numel``:
    the sub-group size; ``pin``: page-lock the staging buffers.
    """

    def __init__(self, store: SwapStore, numels: list[int], keys: list[str], chunk_numel: int,
                 buffer_count: int, pin: bool = False, fills: dict[str, float] | None = None) -> None:
        self.store, self.numels, self.keys = store, list(numels), list(keys)
        self.fills = dict(fills or {})
        self.width = 1 + len(self.keys)  # master + state, per element
        self.chunks: list[_Chunk] = []
        for g, numel in enumerate(self.numels):
            store.create(f"g{g}", self.width * numel, torch.float32)
            for lo in range(0, numel, chunk_numel):
                hi = min(numel, lo + chunk_numel)
                self.chunks.append(_Chunk(g, lo, hi, self.width * lo))
        self.chunk_numel = max(c.hi - c.lo for c in self.chunks)
        self.buffer_count, self.pin = buffer_count, pin
        self.buffers: list[torch.Tensor] = []  # allocated on first use
        self.cached: dict[int, tuple[torch.Tensor, int]] = {}  # group -> (masters in memory, version)
        self.masters = _Masters(self)

    def params_by_group(self) -> list[list[torch.nn.Parameter]]:
        """The chunk parameters of each group, for building the optimizer."""
        out: list[list[torch.nn.Parameter]] = [[] for _ in self.numels]
        for c in self.chunks:
            out[c.group].append(c.param)
        return out

    def _buffer(self, i: int) -> torch.Tensor:
        while len(self.buffers) <= i:
            self.buffers.append(torch.empty(self.width * self.chunk_numel, dtype=torch.float32,
                                            pin_memory=self.pin))
        return self.buffers[i]

    # -- writing the masters -----------------------------------------------------------------------
    def write_masters(self, g: int, values: torch.Tensor) -> None:
        """Set group g's masters from ``values`` (any dtype, ``numels[g]`` elements), chunk by chunk."""
        self.cached.pop(g, None)
        handles = []
        for c in self.chunks:
            if c.group == g:
                piece = values[c.lo:c.hi].to(torch.float32, copy=True).contiguous()
                handles.append(self.store.write(f"g{g}", piece, c.offset))
        wait_all(handles)

    def master(self, g: int) -> torch.Tensor:
        """Group g's masters in memory (read on first access, then cached until :meth:`flush_masters`)."""
        if g not in self.cached:
            out = torch.empty(self.numels[g], dtype=torch.float32)
            wait_all([self.store.read(f"g{g}", out[c.lo:c.hi], c.offset) for c in self.chunks if c.group == g])
            self.cached[g] = (out, out._version)
        return self.cached[g][0]

    def flush_masters(self) -> None:
        """Write back cached masters that were changed in place (a checkpoint load), then drop them."""
        cached, self.cached = self.cached, {}
        for g, (t, version) in cached.items():
            if t._version != version:
                self.write_masters(g, t)

    # -- the step --------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], coef: float,
             write_back: Callable[[int, int, torch.Tensor], object]) -> None:
        """One optimizer step over every chunk: read chunk k+1 and write chunk k-1 while stepping chunk k.

        ``grads[g]``: group g's fp32 gradient partition; ``coef``: unscale/clip factor applied to it
        first; ``write_back(g, lo, masters)`` puts updated masters into the model and may return a
        handle (or a list) that must complete before the staging buffer is reused.
        """
        self.flush_masters()
        n, slots = len(self.chunks), max(1, self.buffer_count)
        pending: list[list] = [[] for _ in range(slots)]  # writes from each staging buffer
        reads: dict[int, object] = {}

        def start_read(i: int) -> None:
            slot = i % slots
            wait_all(pending[slot])  # the buffer is free only once its last write is confirmed
            pending[slot] = []
            c = self.chunks[i]
            size = (c.hi - c.lo) * (self.width if c.ready else 1)
            reads[i] = self.store.read(f"g{c.group}", self._buffer(slot)[:size], c.offset)

        try:
            start_read(0)
            for i, c in enumerate(self.chunks):
                if i + 1 < n and slots > 1:
                    start_read(i + 1)
                reads.pop(i).wait()
                buf = self._buffer(i % slots)
                self._step_chunk(optimizer, c, buf, grads[c.group], coef)
                size = c.hi - c.lo
                done = write_back(c.group, c.lo, buf[:size])
                pending[i % slots] = ([done] if not isinstance(done, list) else done) + [
                    self.store.write(f"g{c.group}", buf[:self.width * size], c.offset)]
                if slots == 1 and i + 1 < n:
                    start_read(i + 1)
        except BaseException:
            try:  # let the transfers still in flight finish before their buffers go away
                wait_all(list(reads.values()) + [h for p in pending for h in p])
            except Exception:  # noqa: BLE001, S110 - the error being raised already says what failed
                pass
            raise
        wait_all([h for p in pending for h in p])

    def _step_chunk(self, optimizer, c: _Chunk, buf: torch.Tensor, grad: torch.Tensor, coef: float) -> None:
        size = c.hi - c.lo
        views = [buf[j * size:(j + 1) * size] for j in range(self.width)]
        g = grad[c.lo:c.hi]
        g = g if g.device.type == "cpu" else g.to("cpu")
        if coef != 1.0:
            g.mul_(coef)
        p = c.param
        p.data = views[0]
        p.grad = g
        if c.ready:
            state = optimizer.state[p]
            state.update(c.scalars)
            state.update(zip(self.keys, views[1:]))
        elif p in optimizer.state:  # state made at construction (for the empty placeholder): size it
            state = optimizer.state[p]
            for key, view in zip(self.keys, views[1:]):
                if key in self.fills:
                    state[key] = view.fill_(self.fills[key])
        try:
            optimizer.step()
            state = optimizer.state[p]
            missing = [k for k in self.keys if k not in state]
            if missing:
                raise DSError(f"the optimizer kept no {missing} state after a step; NVMe offload expected "
                              f"{self.keys} (found when it was probed); use offload_optimizer.device 'cpu'")
            for key, view in zip(self.keys, views[1:]):
                if state[key].data_ptr() != view.data_ptr():  # created by this (first) step
                    view.copy_(state[key])
            if p.data.data_ptr() != views[0].data_ptr():
                views[0].copy_(p.data)
            c.scalars = {k: v for k, v in state.items() if k not in self.keys}
            c.ready = True
        finally:
            optimizer.state.pop(p, None)
            p.grad = None
            p.data = torch.empty(0)

    # -- checkpoints: one state entry per group, as with CPU offload --------------------------------
    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict with one parameter per group (the CPU-offload layout)."""
        state: dict[int, dict] = {}
        for g, numel in enumerate(self.numels):
            chunks = [c for c in self.chunks if c.group == g]
            if not all(c.ready for c in chunks):
                continue
            entry = {k: torch.empty(numel, dtype=torch.float32) for k in self.keys}
            handles = []
            for c in chunks:
                size = c.hi - c.lo
                for j, k in enumerate(self.keys):
                    handles.append(self.store.read(f"g{g}", entry[k][c.lo:c.hi], c.offset + (1 + j) * size))
            wait_all(handles)
            for k, v in chunks[0].scalars.items():
                entry[k] = v.clone() if isinstance(v, torch.Tensor) else v
            state[g] = entry
        groups = [{**{k: v for k, v in pg.items() if k != "params"}, "params": [g]}
                  for g, pg in enumerate(optimizer.param_groups)]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        """Load a per-group state dict (from :meth:`state_dict` or CPU offload) into the chunk files."""
        if len(sd["param_groups"]) != len(optimizer.param_groups):
            raise DSError(f"optimizer state has {len(sd['param_groups'])} parameter groups, this optimizer "
                          f"{len(optimizer.param_groups)}; load it into the same parameter groups")
        self.flush_masters()
        for g, saved in enumerate(sd["param_groups"]):
            optimizer.param_groups[g].update({k: v for k, v in saved.items() if k != "params"})
        for g in range(len(self.numels)):
            entry = sd["state"].get(g, sd["state"].get(str(g)))
            if not entry:
                continue
            missing = [k for k in self.keys if k not in entry]
            if missing:
                raise DSError(f"optimizer state of group {g} lacks {missing}; it was saved by another optimizer "
                              f"type (this one keeps {self.keys})")
            handles = []
            for c in self.chunks:
                if c.group != g:
                    continue
                size = c.hi - c.lo
                for j, k in enumerate(self.keys):
                    piece = entry[k].reshape(-1)[c.lo:c.hi].to(torch.float32, copy=True).contiguous()
                    handles.append(self.store.write(f"g{g}", piece, c.offset + (1 + j) * size))
                c.scalars = {k: (v.detach().clone().cpu() if isinstance(v, torch.Tensor) else v)
                             for k, v in entry.items() if k not in self.keys}
            wait_all(handles)
            for c in self.chunks:
                if c.group == g:
                    c.ready = True

    def close(self) -> None:
        self.cached = {}
        self.buffers = []
        self.store.close()
