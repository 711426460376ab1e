"""Point-to-point transfers between adjacent stages, over ``ds_core.comm`` (torch.distributed send/recv).

What crosses a stage boundary is a tensor or a tuple of tensors. Its shapes, dtypes and
``requires_grad`` flags are sent once per link and direction of use (training, evaluation) and
cached; afterwards only the data moves, and a micro-batch whose shapes differ from the cached ones
is an error naming both. Gradients flow back with the shapes of the activations they belong to, so
they need no metadata.

Deadlocks: every send is non-blocking (``isend``, completed at the end of the batch) and every
receive blocks. A stage therefore only ever waits for data its schedule needs next, and since the
1F1B order is acyclic across stages, some stage can always proceed — the pairing problem of
blocking sends (stage ``s`` sending an activation while ``s + 1`` sends a gradient) cannot arise.

A stage that fails keeps its links in step (``drain``): before the metadata is known it sends an
error marker, which both ends remember, after which neither side uses that link again; once the
metadata is known it sends zeros of the right shapes. The engine then agrees on the failure with
one collective, so every rank raises instead of waiting forever.
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.errors import DSError

__all__ = ["StageLink", "PipeCommError", "DTYPES"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
_OK, _FAILED = 1, 2


class PipeCommError(DSError, RuntimeError):
    """Tensors crossing a stage boundary are not what the other side expects."""


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    items = x if isinstance(x, (tuple, list)) else (x,)
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise PipeCommError(f"a stage output must be a tensor or a tuple of tensors, got {type(t).__name__}; "
                                f"return tensors only from the last layer of each stage")
    return tuple(items)


def _describe(tensors) -> list[tuple[torch.dtype, tuple[int, ...], bool]]:
    return [(t.dtype, tuple(t.shape), bool(t.requires_grad)) for t in tensors]


def _fmt(meta) -> str:
    return ", ".join(f"{tuple(s)} {str(d).replace('torch.', '')}" for d, s, _ in meta)


class StageLink:
    """This rank's links to the previous and next stage (global ranks, ``None`` at the ends)."""

    def __init__(self, stage_id: int, prev_rank: int | None, next_rank: int | None) -> None:
        self.stage_id, self.prev_rank, self.next_rank = stage_id, prev_rank, next_rank
        self.sent_meta: dict[str, list | None] = {"train": None, "eval": None}
        self.recv_meta: dict[str, list | None] = {"train": None, "eval": None}
        self.next_broken = {"train": False, "eval": False}
        self.prev_broken = {"train": False, "eval": False}
        self.pending: list[tuple[object, torch.Tensor]] = []

    # -- activations ---------------------------------------------------------------------------
    def send_activations(self, outputs, mode: str, micro_batch: int, drain: bool) -> None:
        if self.next_broken[mode]:
            return
        cached = self.sent_meta[mode]
        if cached is None:
            if drain:
                self._isend(torch.tensor([1], dtype=torch.int64), self.next_rank)
                self._isend(torch.tensor([_FAILED], dtype=torch.int64), self.next_rank)
                self.next_broken[mode] = True
                return
            tensors = _as_tuple(outputs)
            meta = _describe(tensors)
            if mode == "eval":
                meta = [(d, s, False) for d, s, _ in meta]
            code = [_OK, len(meta)]
            for d, s, g in meta:
                code += [DTYPES.index(d), int(g), len(s), *s]
            self._isend(torch.tensor([len(code)], dtype=torch.int64), self.next_rank)
            self._isend(torch.tensor(code, dtype=torch.int64), self.next_rank)
            self.sent_meta[mode] = cached = meta
        elif not drain:
            tensors = _as_tuple(outputs)
            now = _describe(tensors)
            if [(d, s) for d, s, _ in now] != [(d, s) for d, s, _ in cached]:
                raise PipeCommError(
                    f"stage {self.stage_id} output for micro-batch {micro_batch} is [{_fmt(now)}] but earlier "
                    f"micro-batches sent [{_fmt(cached)}]; stages exchange shapes once, so every micro-batch "
                    f"must have the same shapes (drop the last partial batch, e.g. DataLoader(drop_last=True))")
        if drain:
            tensors = tuple(torch.zeros(s, dtype=d) for d, s, _ in cached)
        for t in tensors:
            self._isend(t.detach().contiguous(), self.next_rank)

    def recv_activations(self, mode: str, device) -> tuple[torch.Tensor, ...] | None:
        """The next activation from the previous stage, or ``None`` if that stage failed."""
        if self.prev_broken[mode]:
            return None
        meta = self.recv_meta[mode]
        if meta is None:
            n = torch.zeros(1, dtype=torch.int64)
            comm.recv(n, src=self.prev_rank)
            code = torch.zeros(int(n), dtype=torch.int64)
            comm.recv(code, src=self.prev_rank)
            code = code.tolist()
            if code[0] == _FAILED:
                self.prev_broken[mode] = True
                return None
            meta, pos = [], 2
            for _ in range(code[1]):
                d, g, nd = code[pos:pos + 3]
                meta.append((DTYPES[d], tuple(code[pos + 3:pos + 3 + nd]), bool(g)))
                pos += 3 + nd
            self.recv_meta[mode] = meta
        out = []
        for d, s, g in meta:
            t = torch.empty(s, dtype=d, device=device)
            comm.recv(t, src=self.prev_rank)
            out.append(t.requires_grad_(g and mode == "train"))
        return tuple(out)

    # -- gradients -----------------------------------------------------------------------------
    def send_grads(self, inputs, drain: bool) -> None:
        """Gradients of the received activations that require grad (zeros where there are none)."""
        if self.prev_broken["train"]:
            return
        meta = self.recv_meta["train"]
        for i, (d, s, g) in enumerate(meta):
            if not g:
                continue
            grad = None if drain or inputs is None else inputs[i].grad
            self._isend(torch.zeros(s, dtype=d) if grad is None else grad.contiguous(), self.prev_rank)

    def recv_grads(self, device) -> list[torch.Tensor | None] | None:
        """Gradients for this stage's outputs, ``None`` for those that do not require grad."""
        if self.next_broken["train"]:
            return None
        out = []
        for d, s, g in self.sent_meta["train"]:
            if not g:
                out.append(None)
                continue
            t = torch.empty(s, dtype=d, device=device)
            comm.recv(t, src=self.next_rank)
            out.append(t)
        return out

    # -- completion ----------------------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dst: int) -> None:
        self.pending.append((comm.isend(t, dst=dst), t))  # keep t alive until the send completes

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []

    def reset_links(self) -> None:
        """After a failed batch the links' state is unknown to the peers' next batch: start over."""
        for d in (self.next_broken, self.prev_broken):
            d.update(train=False, eval=False)
