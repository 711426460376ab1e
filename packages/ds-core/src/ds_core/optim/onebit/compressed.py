"""Error-compensated 1-bit all-reduce: signs packed eight to a byte, one fp32 scale per chunk.

The average of a flat fp32 tensor over a process group, sent as signs (Seide et al. 2014; Tang et al.
2021, "1-bit Adam"), in two phases so that every rank compresses twice, each with its own error buffer:

1. **worker**: ``b = x + worker_error``; the rank's scale is ``s = ||b|| / sqrt(n)`` and its message is
   ``sign(b)`` (bit 1: ``b >= 0``); ``worker_error = b - s * sign(b)``. The packed signs are cut into one
   chunk per rank and exchanged with one ``all_to_all`` (each chunk carries the sender's scale in its
   last four bytes): rank ``r`` receives every rank's signs for chunk ``r``.
2. **server**: rank ``r`` averages what it received, ``c = mean_j(s_j * sign_j) + server_error`` (its
   chunk only), compresses ``c`` the same way (``server_error = c - s_r * sign(c)``) and one
   ``all_gather`` gives every rank every chunk's signs and scale. The result, identical on every rank,
   is written back into ``x``.

Each rank puts ``n/8`` bytes into the all-to-all and receives ``n/8`` from the all-gather (plus four
bytes of scale per chunk in each): 1/16 of the ``4n`` bytes of an fp32 all-reduce of the same tensor,
as the comms logger records them (``all_to_all`` counts its input, ``all_gather`` its output). ``n`` is
padded to a multiple of ``8 × world`` so the chunks are whole bytes; padded entries carry no error.

The error buffers make the compression unbiased over time: what a step's signs lose is added to the
next step's tensor, so the sum of what was sent follows the sum of the true values.
"""

from __future__ import annotations

import math

import torch

from ... import comm

__all__ = ["CompressedAllReduce", "pack_signs", "unpack_signs", "compressed_bytes"]

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.float32)
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
#: row ``b``: the eight signs (+1 / -1) byte ``b`` packs, high bit first
_TABLE = ((torch.arange(256, dtype=torch.uint8).reshape(-1, 1) >> _SHIFTS) & 1).float() * 2 - 1


def pack_signs(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x >= 0`` as bits, eight to a uint8 (the first element in the high bit); ``x.numel() % 8 == 0``.
    (-0.0 counts as negative, as ``copysign`` says.)"""
    if x.numel() % 8:
        raise ValueError(f"pack_signs: {x.numel()} elements is not a multiple of 8; pad the tensor first")
    return _pack_pm1(torch.copysign(torch.ones((), device=x.device), x.float()), out)


def _pack_pm1(signs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack fp32 signs (+1 / -1): byte = sum(w_i * (s_i + 1) / 2) = sum(w_i / 2 * s_i) + 127.5, one pass."""
    packed = torch.addmv(torch.full((), 127.5, device=signs.device), signs.view(-1, 8),
                         _WEIGHTS.to(signs.device) / 2)
    if out is None:
        return packed.round_().to(torch.uint8)
    return out.copy_(packed.round_().view_as(out))


def unpack_signs(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`pack_signs`: +1 for a set bit, -1 for a clear one (fp32, 8 per byte)."""
    table = _TABLE.to(packed.device)
    index = packed.reshape(-1).long()
    if out is None:
        return table.index_select(0, index).reshape(-1)
    torch.index_select(table, 0, index, out=out.view(-1, 8))
    return out


def compressed_bytes(numel: int, world: int) -> tuple[int, int]:
    """Bytes the comms logger records for one call on ``numel`` elements: (all_to_all, all_gather)."""
    padded = _padded(numel, world)
    return padded // 8 + 4 * world, padded // 8 + 4 * world


def _padded(numel: int, world: int) -> int:
    unit = 8 * world
    return max(unit, math.ceil(numel / unit) * unit)


def _scale(x: torch.Tensor, count: int) -> torch.Tensor:
    return (torch.linalg.vector_norm(x) / math.sqrt(max(count, 1))).reshape(1).float()


class CompressedAllReduce:
    """The 1-bit average of tensors of ``numel`` elements over ``group`` (see the module docstring).

    Holds the two error buffers, which persist across calls: ``worker_error`` (the whole padded tensor)
    and ``server_error`` (this rank's chunk). Both are part of a training checkpoint.
    """

    def __init__(self, numel: int, group=None, device: torch.device | str = "cpu") -> None:
        self.numel = numel
        self.group = group
        self.world = comm.get_world_size(group)
        self.rank = comm.get_rank(group)
        self.padded = _padded(numel, self.world)
        self.chunk = self.padded // self.world
        self.worker_error = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.server_error = torch.zeros(self.chunk, dtype=torch.float32, device=device)
        # Real (unpadded) elements in each chunk, for the scale's sqrt(count).
        self._counts = [max(0, min(self.chunk, numel - r * self.chunk)) for r in range(self.world)]
        self._scratch: torch.Tensor | None = None

    def state(self) -> dict[str, torch.Tensor]:
        return {"worker_error": self.worker_error, "server_error": self.server_error}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, buf in self.state().items():
            saved = tensors.get(name)
            if saved is None or saved.shape != buf.shape:
                raise ValueError(f"1-bit error buffer {name!r}: saved "
                                 f"{None if saved is None else tuple(saved.shape)}, this run needs {tuple(buf.shape)} "
                                 f"(the same parameters on the same number of data-parallel ranks)")
            buf.copy_(saved)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Replace ``x`` (fp32, ``numel`` elements) by the compressed average over the group; returns ``x``."""
        if x.numel() != self.numel:
            raise ValueError(f"compressed all-reduce built for {self.numel} elements got {x.numel()}")
        n, world, chunk = self.numel, self.world, self.chunk
        nb = chunk // 8
        if self._scratch is None:  # reused every call: fresh large buffers cost page faults each time
            dev = self.worker_error.device
            self._scratch = torch.empty(self.padded, dtype=torch.float32, device=dev)
            self._send = torch.empty(world, nb + 4, dtype=torch.uint8, device=dev)
            self._recv = torch.empty_like(self._send)
            self._mine = torch.empty(nb + 4, dtype=torch.uint8, device=dev)
            self._gathered = torch.empty(world, nb + 4, dtype=torch.uint8, device=dev)
            self._avg = torch.empty(chunk, dtype=torch.float32, device=dev)
        flat = x.reshape(-1)
        signs = self._scratch
        # worker compression, with error feedback: the error buffer becomes b = x + error, then b - s*sign(b)
        buf = self.worker_error
        buf[:n] += flat
        scale = _scale(buf[:n], n)
        torch.copysign(torch.ones((), device=buf.device), buf, out=signs)
        _pack_pm1(signs, out=self._send[:, :nb])
        self._send[:, nb:] = scale.view(torch.uint8)
        buf.addcmul_(signs, scale, value=-1.0)
        buf[n:] = 0.0
        if world > 1:
            comm.all_to_all(self._recv, self._send, group=self.group)
        else:
            self._recv.copy_(self._send)
        # server: average this rank's chunk from every worker, compress again
        scales = self._recv[:, nb:].reshape(-1).clone().view(torch.float32)
        received = unpack_signs(self._recv[:, :nb], out=signs).view(world, chunk)
        avg = torch.mv(received.t(), scales / world, out=self._avg).add_(self.server_error)
        count = self._counts[self.rank]
        avg[count:] = 0.0
        server_scale = _scale(avg[:count], count)
        server_signs = torch.copysign(torch.ones((), device=avg.device), avg)
        _pack_pm1(server_signs, out=self._mine[:nb])
        self._mine[nb:] = server_scale.view(torch.uint8)
        self.server_error.copy_(avg).addcmul_(server_signs, server_scale, value=-1.0)
        self.server_error[count:] = 0.0
        if world > 1:
            comm.all_gather(self._gathered.view(-1), self._mine, group=self.group)
        else:
            self._gathered.copy_(self._mine.view(1, -1))
        server_scales = self._gathered[:, nb:].reshape(-1).clone().view(torch.float32)
        out = unpack_signs(self._gathered[:, :nb], out=signs).view(world, chunk)
        out.mul_(server_scales.view(world, 1))
        flat.copy_(out.reshape(-1)[:n])
        return x
