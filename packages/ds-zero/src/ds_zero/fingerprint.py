"""Fingerprints on stage-3 collectives, so that ranks running different modules fail with the module's name.

Under ZeRO stage 3 every module's parameters are gathered with a collective, so every rank must run
the same modules in the same order. When one does not (a data-dependent branch taken on one rank
only), the collectives pair up wrongly: gathers of equal size silently exchange the wrong
parameters, a size mismatch aborts the process inside gloo ("Received data size doesn't match"),
and a missing gather hangs until the process-group timeout.

So every stage-3 all-gather carries a :class:`Fingerprint` header at the front of each rank's slot:
what kind of collective it is, its sequence number in the step, the module it gathers for (a 64-bit
hash of the qualified name) and its length. After the collective each rank compares every rank's
header with its own and raises :class:`ModulePathMismatchError` naming its module and its peers'.
``prefetch.py`` decides when a small fixed-size exchange of headers must come first (so that
collectives of different sizes are never issued) and exchanges a digest of the module path once per
step; :func:`wait_bounded` turns a wait past ``stage3_hang_timeout`` (or the process group's own
timeout) into a :class:`GatherTimeoutError` naming the module instead of a hang.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import NamedTuple

import torch

from ds_core import comm
from ds_core.errors import CommError

__all__ = ["Fingerprint", "ModulePathMismatchError", "GatherTimeoutError", "key_of", "name_of",
           "header_len", "exchange", "check_rows", "wait_bounded", "PLAIN", "DATA", "NOTICE", "GUARD",
           "DIGEST"]

MAGIC = 0x5A3E_0000
PLAIN, DATA, NOTICE, GUARD, DIGEST = 1, 2, 3, 4, 5
WORDS = 7  # int64 words of a header

_names: dict[int, str] = {}


class ModulePathMismatchError(CommError):
    """Ranks issued different stage-3 collectives: they run different modules (or in another order)."""


class GatherTimeoutError(CommError):
    """A stage-3 collective did not complete in time: another rank never reached it."""


def key_of(text: str) -> int:
    """A 64-bit key for ``text``, the same in every process (Python's ``hash`` is salted per process)."""
    key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
    _names.setdefault(key, text)
    return key


def name_of(key: int) -> str:
    """The text a key was made from, if this process made it; else the key in hex."""
    return _names.get(key, f"an unknown name (key {key & (2**64 - 1):#018x})")


def header_len(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` a header occupies (its 7 int64 words, bit for bit)."""
    return WORDS * 8 // torch.empty((), dtype=dtype).element_size()


class Fingerprint(NamedTuple):
    """One rank's description of a collective. ``key``: the module (and phase) it is issued at;
    ``target``: the module whose parameters it gathers (differs from ``key`` for a prefetch);
    ``length``: elements this rank sends; ``off_key``/``off_expected``: where this rank left the
    module order recorded on an earlier step (the module it ran and the one recorded), else 0.
    For ``DIGEST``, ``seq`` counts the step's modules, ``key`` hashes their order, ``target`` is the
    last one and ``length`` the position where this rank left the recorded order (-1: it did not)."""

    kind: int
    seq: int
    key: int
    target: int
    length: int
    off_key: int = 0
    off_expected: int = 0

    def words(self) -> list[int]:
        return [MAGIC | self.kind, self.seq, self.key, self.target, self.length, self.off_key, self.off_expected]

    def encode(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The header as ``header_len(dtype)`` elements of ``dtype`` (the int64 bits, reinterpreted)."""
        return torch.tensor(self.words(), dtype=torch.int64, device=device).view(dtype)

    @classmethod
    def decode(cls, words: list[int]) -> Fingerprint | None:
        """The fingerprint of a header's words; None when they are not a header (another collective)."""
        if words[0] & ~0xFFFF != MAGIC:
            return None
        return cls(words[0] & 0xFFFF, *words[1:])


def decode_rows(rows: torch.Tensor) -> list[Fingerprint | None]:
    """Every rank's fingerprint from a ``[world, header_len]`` tensor of any dtype."""
    words = rows.contiguous().view(torch.int64).reshape(rows.shape[0], WORDS).tolist()
    return [Fingerprint.decode(w) for w in words]


def describe(fp: Fingerprint | None) -> str:
    if fp is None:
        return "a different collective (not a ZeRO stage-3 parameter gather)"
    if fp.kind == PLAIN:
        return f"an all-gather of parameters {name_of(fp.key)} (length {fp.length})"
    if fp.kind == DIGEST:
        last = f", the last {name_of(fp.target)!r}" if fp.seq else ""
        text = f"the check of the step's module order, after {fp.seq} module(s){last}"
    elif fp.kind == DATA and fp.key != fp.target:
        text = f"a prefetch of module {name_of(fp.target)!r} started at module {name_of(fp.key)!r}"
    else:
        text = f"the all-gather for module {name_of(fp.target)!r}"
    if fp.off_key:
        expected = (f"where {name_of(fp.off_expected)!r} was recorded" if fp.off_expected
                    else "after the recorded order had ended")
        where = f" at module #{fp.length + 1} of the step" if fp.kind == DIGEST else ""
        text += (f" — it left the module order recorded on an earlier step{where}, running "
                 f"{name_of(fp.off_key)!r} {expected}")
    return text


def mismatch_error(rows: list[Fingerprint | None], rank: int) -> ModulePathMismatchError:
    lines = "\n".join(f"  rank {r}{' (this rank)' if r == rank else ''}: {describe(fp)}"
                      for r, fp in enumerate(rows))
    return ModulePathMismatchError(
        f"ZeRO stage 3: ranks are running different modules; their parameter all-gathers do not match:\n"
        f"{lines}\nEvery rank must run the same modules in the same order under stage 3 (each module's "
        f"parameters are gathered with a collective, and gradients are reduced in backward order). Make "
        f"data-dependent branches agree across ranks (decide them from an all-reduced value), or run every "
        f"branch on every rank and discard the unused outputs")


def check_rows(rows: list[Fingerprint | None], mine: Fingerprint, rank: int) -> None:
    """Raise :class:`ModulePathMismatchError` unless every rank's fingerprint equals ``mine``."""
    if any(fp != mine for fp in rows):
        raise mismatch_error(rows, rank)


def wait_bounded(work, timeout: float | None, fp: Fingerprint, rank: int) -> None:
    """``work.wait()``, at most ``timeout`` seconds (None: the process group's timeout); a timeout or a
    peer that went away becomes a :class:`GatherTimeoutError` naming the collective."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        limit = f"{timeout:g} s (stage3_hang_timeout)" if timeout is not None else "the process-group timeout"
        raise GatherTimeoutError(
            f"ZeRO stage 3: rank {rank} waited in {describe(fp)} and the other ranks did not join within "
            f"{limit} ({exc}). They are running other modules or collectives (a different module path: "
            f"a data-dependent branch, an extra or skipped forward) or one of them failed. Make every rank "
            f"run the same modules in the same order; raise stage3_hang_timeout if a rank is only slow"
        ) from exc


def exchange(fp: Fingerprint, group, timeout: float | None) -> list[Fingerprint | None]:
    """Every rank's fingerprint, through one small all-gather of fixed size (safe to issue even
    when the ranks are out of step), checked against ``fp``."""
    world = comm.get_world_size(group)
    mine = torch.tensor(fp.words(), dtype=torch.int64)
    out = torch.empty(world * WORDS, dtype=torch.int64)
    work = comm.all_gather(out, mine, group=group, async_op=True)
    rank = comm.get_rank(group)
    wait_bounded(work, timeout, fp, rank)
    rows = [Fingerprint.decode(w) for w in out.view(world, WORDS).tolist()]
    check_rows(rows, fp, rank)
    return rows
