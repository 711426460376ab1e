"""The comms logger: count, bytes, latency, algorithmic and bus bandwidth of every collective.

Bus bandwidth follows the NCCL-tests convention so numbers compare across world sizes:
all_reduce moves 2(n-1)/n of the message over each link, all_gather / reduce_scatter / all_to_all
move (n-1)/n, and broadcast / send / recv move the message once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["CommsLogger", "comms_logger", "bus_factor"]


def bus_factor(op: str, world: int) -> float:
    if world <= 1:
        return 1.0
    if op == "all_reduce":
        return 2 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (world - 1) / world
    return 1.0


@dataclass
class _Stat:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0
    busbw_weighted: float = 0.0


@dataclass
class CommsLogger:
    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    prof_ops: list[str] = field(default_factory=list)
    stats: dict[tuple[str, int], _Stat] = field(default_factory=lambda: defaultdict(_Stat))

    def configure(self, section) -> None:
        """Apply a ``comms_logger`` config section (a CommsLoggerConfig)."""
        self.enabled = section.enabled
        self.verbose = section.verbose
        self.prof_all = section.prof_all
        self.prof_ops = list(section.prof_ops)

    def wants(self, op: str) -> bool:
        return self.enabled and (self.prof_all or op in self.prof_ops)

    @contextmanager
    def record(self, op: str, nbytes: int, world: int, sync=None):
        """Time one collective; ``sync`` (the accelerator's synchronize) makes the time honest."""
        if not self.wants(op):
            yield
            return
        if sync:
            sync()
        start = time.perf_counter()
        yield
        if sync:
            sync()
        self.add(op, nbytes, time.perf_counter() - start, world)

    def add(self, op: str, nbytes: int, seconds: float, world: int) -> None:
        stat = self.stats[(op, nbytes)]
        stat.count += 1
        stat.bytes += nbytes
        stat.seconds += seconds
        algbw = nbytes / seconds if seconds > 0 else 0.0
        stat.busbw_weighted += algbw * bus_factor(op, world)
        if self.verbose:
            print(f"[comms] {op} {nbytes} B {seconds * 1e3:.3f} ms "
                  f"algbw {algbw / 1e9:.3f} GB/s busbw {algbw * bus_factor(op, world) / 1e9:.3f} GB/s")

    def summary(self) -> str:
        """A table: op, message size, count, total and average latency, algbw, busbw."""
        head = f"{'op':<16}{'msg size':>12}{'count':>8}{'total ms':>12}{'avg ms':>10}{'algbw GB/s':>12}{'busbw GB/s':>12}"
        lines = [head, "-" * len(head)]
        for (op, size), s in sorted(self.stats.items()):
            avg = s.seconds / s.count
            algbw = s.bytes / s.seconds / 1e9 if s.seconds else 0.0
            busbw = s.busbw_weighted / s.count / 1e9
            lines.append(f"{op:<16}{_human(size):>12}{s.count:>8}{s.seconds * 1e3:>12.3f}"
                         f"{avg * 1e3:>10.3f}{algbw:>12.3f}{busbw:>12.3f}")
        return "\n".join(lines)

    def totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "bytes": 0, "seconds": 0.0})
        for (op, _), s in self.stats.items():
            out[op]["count"] += s.count
            out[op]["bytes"] += s.bytes
            out[op]["seconds"] += s.seconds
        return dict(out)

    def reset(self) -> None:
        self.stats.clear()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


comms_logger = CommsLogger()
