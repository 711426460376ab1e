"""Prometheus metrics of the server, in the text exposition format (``GET /metrics``).

Counters and histograms are fed by the engine thread through the :class:`EngineObserver` hooks;
gauges (queue depth, running requests, KV-block usage) are read from the engine when scraped.
A few dozen lines of our own rather than a dependency: the format is three line types.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

from .engine import EngineObserver

__all__ = ["ServerMetrics", "Histogram"]

PREFIX = "ds_serve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)  # fmt: skip


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` upper bounds, ``+Inf`` last)."""

    def __init__(self, buckets=LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum}")
        lines.append(f"{name}_count {self.count}")
        return lines

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (a coarse estimate, for logs)."""
        target, running = q * self.count, 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            if running >= target:
                return bound
        return float("inf")


class ServerMetrics(EngineObserver):
    """Everything ``/metrics`` reports; thread-safe (engine thread writes, HTTP thread reads)."""

    def __init__(self, window: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.window = window
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens sampled) per step
        self._recent_finished: deque[float] = deque()

    # --- engine hooks ---------------------------------------------------------------------------

    def on_step(self, num_tokens: int, num_sampled: int, seconds: float) -> None:
        t = time.monotonic()
        with self._lock:
            self.generation_tokens += num_sampled
            self._recent.append((t, num_sampled))
            while self._recent and self._recent[0][0] < t - self.window:
                self._recent.popleft()

    def on_first_token(self, seq, ttft: float) -> None:
        with self._lock:
            self.ttft.observe(ttft)
            self.prompt_tokens += seq.num_prompt_tokens

    def on_token(self, seq, itl: float) -> None:
        with self._lock:
            self.itl.observe(itl)

    def on_finish(self, seq, e2e: float) -> None:
        with self._lock:
            reason = seq.finish_reason or "unknown"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e)
            t = time.monotonic()
            self._recent_finished.append(t)
            while self._recent_finished and self._recent_finished[0] < t - 60:
                self._recent_finished.popleft()

    def on_reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # --- derived --------------------------------------------------------------------------------

    def tokens_per_second(self) -> float:
        with self._lock:
            if not self._recent:
                return 0.0
            span = max(time.monotonic() - self._recent[0][0], 1e-3)
            return sum(n for _, n in self._recent) / span

    def finish_rate(self) -> float:
        """Requests finished per second over the last minute (0 when none)."""
        with self._lock:
            if len(self._recent_finished) < 2:
                return 0.0
            span = max(time.monotonic() - self._recent_finished[0], 1e-3)
            return len(self._recent_finished) / span

    def render(self, engine_stats: dict) -> str:
        def gauge(name, value, about):
            return [f"# HELP {PREFIX}_{name} {about}", f"# TYPE {PREFIX}_{name} gauge", f"{PREFIX}_{name} {value}"]

        def counter(name, value, about, label=None):
            lines = [f"# HELP {PREFIX}_{name} {about}", f"# TYPE {PREFIX}_{name} counter"]
            if label is None:
                lines.append(f"{PREFIX}_{name} {value}")
            else:
                key, values = label
                lines += [f'{PREFIX}_{name}{{{key}="{k}"}} {v}' for k, v in sorted(values.items())]
            return lines

        def histogram(name, hist, about):
            return [f"# HELP {PREFIX}_{name} {about}", f"# TYPE {PREFIX}_{name} histogram",
                    *hist.render(f"{PREFIX}_{name}")]  # fmt: skip

        s = engine_stats
        tps = self.tokens_per_second()
        with self._lock:
            lines = [
                *gauge("requests_waiting", s["waiting"], "Requests queued for admission (queue depth)."),
                *gauge("requests_running", s["running"], "Requests holding KV blocks and being decoded."),
                *gauge("requests_swapped", s["swapped"], "Preempted requests whose KV is in host memory."),
                *gauge("kv_blocks_used", s["kv_blocks_used"], "KV-cache blocks in use."),
                *gauge("kv_blocks_total", s["kv_blocks_total"], "KV-cache blocks in all."),
                *gauge("kv_cache_usage_ratio", s["kv_usage"], "Fraction of KV-cache blocks in use."),
                *gauge("generation_tokens_per_second", round(tps, 3),
                       f"Tokens generated per second over the last {self.window:g} s."),
                *counter("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of requests that started."),
                *counter("generation_tokens_total", self.generation_tokens, "Tokens generated."),
                *counter("prefix_cache_queries_total", s["prefix_cache_queries"], "Prompt tokens looked up."),
                *counter("prefix_cache_hits_total", s["prefix_cache_hits"], "Prompt tokens found in the cache."),
                *counter("preemptions_total", s["preemptions"], "Requests preempted for lack of KV blocks."),
                *counter("requests_finished_total", None, "Finished requests by finish reason.",
                         ("finish_reason", self.finished or {"stop": 0})),
                *counter("requests_rejected_total", None, "Requests refused before queueing.",
                         ("reason", self.rejected or {"queue_full": 0})),
                *histogram("time_to_first_token_seconds", self.ttft, "Arrival to first token."),
                *histogram("inter_token_latency_seconds", self.itl, "Time between consecutive tokens."),
                *histogram("e2e_request_latency_seconds", self.e2e, "Arrival to finish."),
            ]
        return "\n".join(lines) + "\n"
