"""Where the stage boundaries fall: contiguous layer ranges of balanced weight.

A method turns each layer into a weight — its parameter count (``parameters``), 1 (``uniform``), or
1 if its class name matches a regex (``type:<regex>``, case-insensitive, as in DeepSpeed) — and
:func:`balanced_boundaries` cuts the sequence into ``num_stages`` non-empty contiguous parts whose
heaviest part is as light as possible (the linear partition problem, solved exactly by dynamic
programming: O(stages · layers²), negligible for layer lists).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ds_core.errors import ConfigError

__all__ = ["layer_weights", "balanced_boundaries", "METHODS"]

METHODS = ("parameters", "uniform", "type:<regex>")


def layer_weights(method: str, names: Sequence[str], param_counts: Sequence[int]) -> list[int]:
    """Weight of each layer under ``method`` (``names`` are class names, used by ``type:``)."""
    method_l = method.lower()
    if method_l == "parameters":
        return list(param_counts)
    if method_l == "uniform":
        return [1] * len(names)
    if method_l.startswith("type:"):
        pattern = method[len("type:"):]
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"partition_method {method!r}: {pattern!r} is not a valid regex ({exc})") from None
        weights = [1 if regex.search(n) else 0 for n in names]
        if not any(weights):
            raise ConfigError(
                f"partition_method {method!r} matches no layer: the layer classes are "
                f"{', '.join(sorted(set(names)))}; use a regex matching one of them, or 'parameters'")
        return weights
    raise ConfigError(f"partition_method {method!r} is not known; use one of {', '.join(METHODS)}")


def balanced_boundaries(weights: Sequence[int], num_stages: int) -> list[int]:
    """``parts`` with ``parts[s]:parts[s+1]`` the layers of stage ``s`` (``len == num_stages + 1``).

    Minimises the heaviest stage; ties go to the split whose largest stage has fewest layers, so
    weightless layers (norms, activations) spread out instead of piling onto one stage.
    """
    n = len(weights)
    if num_stages < 1:
        raise ConfigError(f"num_stages {num_stages} must be >= 1")
    if num_stages > n:
        raise ConfigError(f"{num_stages} pipeline stages but only {n} layers: every stage needs at least "
                          f"one layer; use at most {n} stages or split the model into more layers")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = (float("inf"), float("inf"))
    # best[s][i]: cost of placing the first i layers on s stages; cut[s][i]: where stage s-1 starts.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                prev = best[s - 1][j]
                if prev == inf:
                    continue
                cost = (max(prev[0], prefix[i] - prefix[j]), max(prev[1], i - j))
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    parts = [n]
    for s in range(num_stages, 0, -1):
        parts.append(cut[s][parts[-1]])
    return parts[::-1]
