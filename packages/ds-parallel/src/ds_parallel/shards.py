"""Which rows of a full weight each tensor-parallel rank holds.

A shard is described by *runs*: ``(start, length)`` ranges along one dimension of the full tensor, in
the order the rank stores them. One run is the usual contiguous block; several runs describe a fused
projection split per part (Q, K and V of a fused QKV each split on its own, so every rank holds its
own heads of each) and repeated runs describe KV heads replicated across ranks.

The output of a column-parallel layer is described by :class:`Part` s laid end to end:

- :class:`Part` — ``size`` rows split evenly in units of ``unit`` (a head is ``head_dim`` rows, so
  no head is ever cut);
- :class:`KVHeads` — grouped-query K or V heads. When the KV heads divide the tensor-parallel size
  they are split like any part; otherwise they are *replicated*: every rank keeps all KV rows in
  full and uses the heads its query heads attend with (``kv_replication`` below);
- :class:`GroupedQKV` — Falcon's "new decoder architecture" layout, ``[kv groups][q heads of the
  group, k, v][head_dim]``;
- :class:`VocabPart` — a vocabulary, split into nearly equal pieces when it does not divide.

[Note: KV replication] With ``h`` query heads, ``kv`` KV heads and tensor-parallel size ``tp``
(``h % tp == 0`` and ``h % kv == 0``), each KV head is conceptually repeated ``r = lcm(kv, tp) / kv``
times (``repeat_interleave``), giving ``lcm(kv, tp)`` heads that split evenly: rank ``i`` uses copies
``i·c … (i+1)·c - 1`` with ``c = lcm(kv, tp) / tp``, so its ``h / tp`` query heads keep the grouping
``h / lcm(kv, tp)`` queries per KV head. The weight itself is stored once per rank (all KV rows,
replicated, with a gradient summed over the tensor group since each rank back-propagates only its
query heads), never duplicated inside a rank: a duplicated row would be counted twice by a global
gradient norm and would need its copies' gradients added before every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds_core.errors import ConfigError

__all__ = [
    "Run",
    "read_runs",
    "Part",
    "KVHeads",
    "GroupedQKV",
    "VocabPart",
    "Piece",
    "ColumnSpec",
    "ShardInfo",
    "even_run",
    "vocab_sizes",
    "kv_replication",
    "column_spec",
    "take_runs",
    "merge_runs",
]

Run = tuple[int, int]


def merge_runs(runs) -> tuple[Run, ...]:
    """Join runs that continue each other (``(0, 4), (4, 4)`` -> ``(0, 8)``); drop empty ones."""
    out: list[list[int]] = []
    for start, length in runs:
        if length == 0:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length])
    return tuple((a, b) for a, b in out)


def take_runs(full: torch.Tensor, dim: int, runs) -> torch.Tensor:
    """The rows ``runs`` of ``full`` along ``dim``, concatenated in order (a view when one run)."""
    runs = tuple(runs)
    if len(runs) == 1:
        return full.narrow(dim, *runs[0])
    return torch.cat([full.narrow(dim, s, n) for s, n in runs], dim=dim)


def even_run(size: int, tp: int, rank: int, unit: int = 1, what: str = "dimension") -> Run:
    """This rank's block of ``size`` rows split into ``tp`` equal blocks of whole ``unit`` s."""
    if size % unit or (size // unit) % tp:
        units = "" if unit == 1 else f" ({size // unit} units of {unit})" if size % unit == 0 else f" (not whole units of {unit})"
        raise ConfigError(f"{what} of size {size}{units} cannot be split evenly over tensor-parallel size "
                          f"{tp}; choose an autotp_size that divides it, or keep this module replicated "
                          f"with a plan override {{'<module name>': 'replicate'}}")
    block = size // tp
    return rank * block, block


def vocab_sizes(size: int, tp: int) -> tuple[int, ...]:
    """Nearly equal pieces of a vocabulary (the first ``size % tp`` ranks get one row more)."""
    if size < tp:
        raise ConfigError(f"a vocabulary of {size} rows cannot be split over tensor-parallel size {tp}")
    base, extra = divmod(size, tp)
    return tuple(base + (1 if r < extra else 0) for r in range(tp))


def kv_replication(num_heads: int, num_kv_heads: int, tp: int, what: str = "attention") -> tuple[int, int]:
    """``(copies of each KV head, KV heads per rank)`` for grouped-query attention over ``tp`` ranks.

    ``copies == 1`` means the KV heads split evenly; see [Note: KV replication] for the rest.
    """
    if num_heads % tp:
        raise ConfigError(f"{what}: {num_heads} query heads cannot be split over tensor-parallel size {tp} "
                          f"(heads must divide evenly); choose an autotp_size that divides {num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ConfigError(f"{what}: {num_kv_heads} key/value heads do not divide {num_heads} query heads; "
                          f"the model's head counts are inconsistent")
    total = math.lcm(num_kv_heads, tp)
    return total // num_kv_heads, total // tp


@dataclass(frozen=True)
class Piece:
    """``length`` rows starting at ``start`` of the full output; ``replicated``: read from the rows
    every rank keeps in full rather than from this rank's shard."""

    start: int
    length: int
    replicated: bool = False


@dataclass(frozen=True)
class Part:
    """``size`` rows split evenly in units of ``unit``."""

    size: int
    unit: int = 1
    name: str = "part"

    def pieces(self, tp: int, rank: int) -> list[Piece]:
        start, length = even_run(self.size, tp, rank, self.unit, self.name)
        return [Piece(start, length)]

    def replicated_runs(self, tp: int) -> list[Run]:
        return []


@dataclass(frozen=True)
class KVHeads:
    """Key or value heads of grouped-query attention: split when they divide ``tp``, else replicated."""

    num_kv_heads: int
    head_dim: int
    num_heads: int
    name: str = "key/value projection"

    @property
    def size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def copies(self, tp: int) -> int:
        return kv_replication(self.num_heads, self.num_kv_heads, tp, self.name)[0]

    def pieces(self, tp: int, rank: int) -> list[Piece]:
        copies, per_rank = kv_replication(self.num_heads, self.num_kv_heads, tp, self.name)
        if copies == 1:
            return [Piece(rank * per_rank * self.head_dim, per_rank * self.head_dim)]
        heads = [c // copies for c in range(rank * per_rank, (rank + 1) * per_rank)]
        return [Piece(h * self.head_dim, self.head_dim, replicated=True) for h in heads]

    def replicated_runs(self, tp: int) -> list[Run]:
        return [] if self.copies(tp) == 1 else [(0, self.size)]


@dataclass(frozen=True)
class GroupedQKV:
    """Falcon's grouped layout: per KV group, its ``group`` query heads then one K and one V head."""

    num_kv_heads: int
    group: int
    head_dim: int
    name: str = "query_key_value"

    @property
    def size(self) -> int:
        return self.num_kv_heads * (self.group + 2) * self.head_dim

    def _unit(self) -> int:
        return (self.group + 2) * self.head_dim

    def pieces(self, tp: int, rank: int) -> list[Piece]:
        if self.num_kv_heads % tp == 0:  # whole groups per rank
            start, length = even_run(self.size, tp, rank, self._unit(), self.name)
            return [Piece(start, length)]
        if tp % self.num_kv_heads or self.group % (tp // self.num_kv_heads):
            raise ConfigError(f"{self.name}: {self.num_kv_heads} KV groups of {self.group} query heads cannot "
                              f"be split over tensor-parallel size {tp}; the size must divide the groups or be "
                              f"a multiple of them that divides each group's query heads")
        share = tp // self.num_kv_heads  # ranks per group
        g, sub = divmod(rank, share)
        local = self.group // share
        base = g * self._unit()
        hd = self.head_dim
        return [Piece(base + sub * local * hd, local * hd),
                Piece(base + self.group * hd, hd, replicated=True),
                Piece(base + (self.group + 1) * hd, hd, replicated=True)]

    def replicated_runs(self, tp: int) -> list[Run]:
        if self.num_kv_heads % tp == 0:
            return []
        hd, unit = self.head_dim, self._unit()
        return [(g * unit + self.group * hd, 2 * hd) for g in range(self.num_kv_heads)]


@dataclass(frozen=True)
class VocabPart:
    """A vocabulary dimension: nearly equal pieces (see :func:`vocab_sizes`)."""

    size: int
    name: str = "vocabulary"

    def pieces(self, tp: int, rank: int) -> list[Piece]:
        sizes = vocab_sizes(self.size, tp)
        return [Piece(sum(sizes[:rank]), sizes[rank])]

    def replicated_runs(self, tp: int) -> list[Run]:
        return []


@dataclass(frozen=True)
class ColumnSpec:
    """How one rank's column-parallel output is assembled.

    ``shard_runs``: rows of the full weight this rank owns (its ``weight``), in order;
    ``rep_runs``: rows every rank keeps in full (its ``weight_replicated``; empty when none);
    ``order``: the local output as ``(source, start, length)`` pieces, ``source`` 0 for the shard and
    1 for the replicated rows, ``start`` counted within that source.
    """

    full: int
    shard_runs: tuple[Run, ...]
    rep_runs: tuple[Run, ...]
    order: tuple[tuple[int, int, int], ...]

    @property
    def local(self) -> int:
        return sum(n for _, _, n in self.order)

    @property
    def shard_rows(self) -> int:
        return sum(n for _, n in self.shard_runs)

    @property
    def rep_rows(self) -> int:
        return sum(n for _, n in self.rep_runs)

    @property
    def simple(self) -> bool:
        """The local output is exactly this rank's shard, in order (no replicated rows)."""
        return not self.rep_runs


def column_spec(parts, tp: int, rank: int) -> ColumnSpec:
    """The :class:`ColumnSpec` of output ``parts`` (laid end to end) on ``rank`` of ``tp``."""
    shard_runs: list[Run] = []
    rep_runs: list[Run] = []
    pieces: list[Piece] = []
    offset = 0
    for part in parts:
        for piece in part.pieces(tp, rank):
            pieces.append(Piece(offset + piece.start, piece.length, piece.replicated))
        rep_runs += [(offset + s, n) for s, n in part.replicated_runs(tp)]
        offset += part.size
    rep_runs_t = merge_runs(rep_runs)
    # position of each full row range inside the replicated block
    rep_at: list[tuple[int, int, int]] = []
    pos = 0
    for s, n in rep_runs_t:
        rep_at.append((s, n, pos))
        pos += n
    order: list[tuple[int, int, int]] = []
    shard_pos = 0
    for piece in pieces:
        if piece.replicated:
            for s, n, p in rep_at:
                if s <= piece.start and piece.start + piece.length <= s + n:
                    order.append((1, p + piece.start - s, piece.length))
                    break
            else:  # a part's pieces always lie inside its own replicated runs
                raise AssertionError(f"replicated piece {piece} outside {rep_runs_t}")
        else:
            shard_runs.append((piece.start, piece.length))
            order.append((0, shard_pos, piece.length))
            shard_pos += piece.length
    merged: list[list[int]] = []
    for src, start, length in order:  # adjacent pieces of one source read as one slice
        if merged and merged[-1][0] == src and merged[-1][1] + merged[-1][2] == start:
            merged[-1][2] += length
        else:
            merged.append([src, start, length])
    return ColumnSpec(offset, merge_runs(shard_runs), rep_runs_t, tuple(tuple(m) for m in merged))


@dataclass(frozen=True)
class ShardInfo:
    """How a local parameter maps onto the full tensor of the unsharded model.

    ``target`` names the full tensor relative to the owning module (``"weight"`` for both the shard
    and the replicated rows of a column-parallel layer); ``dim`` is the split dimension;
    ``full_shape`` the unsharded shape; ``runs`` the full rows held locally, in order. ``replicated``
    parameters are identical on every tensor rank.
    """

    target: str
    dim: int
    full_shape: tuple[int, ...]
    runs: tuple[Run, ...]
    replicated: bool = False

    def to_json(self) -> dict:
        return {"target": self.target, "dim": self.dim, "full_shape": list(self.full_shape),
                "runs": [list(r) for r in self.runs], "replicated": self.replicated}

    @classmethod
    def from_json(cls, data: dict) -> ShardInfo:
        return cls(data["target"], data["dim"], tuple(data["full_shape"]),
                   tuple(tuple(r) for r in data["runs"]), data.get("replicated", False))


def read_runs(sl, dim: int, runs) -> torch.Tensor:
    """Read ``runs`` along ``dim`` from a safetensors slice object, reading only those bytes."""
    rank = len(sl.get_shape())
    pieces = []
    for start, length in runs:
        index = tuple([slice(None)] * dim + [slice(start, start + length)] + [slice(None)] * (rank - dim - 1))
        pieces.append(sl[index])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
