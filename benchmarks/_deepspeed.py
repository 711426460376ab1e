"""DeepSpeed itself as an optional baseline of the training benchmarks.

When ``deepspeed`` is importable, ``bench_engine.py``, ``bench_zero.py``, ``bench_zero3.py``,
``bench_pipe.py`` and ``bench_moe.py`` also run DeepSpeed on the same model, data and config, in the
same rank processes, alternating with ours, and print the ratio ds / DeepSpeed of the medians. It is
never a dependency of a ds package: ``nox -s bench`` installs it (with ``torch==2.13.0`` on the same
pip line, so pip keeps the pinned CPU torch), or ``pip install deepspeed torch==2.13.0`` by hand.

On a machine without CUDA DeepSpeed runs on its CPU accelerator (``DS_ACCELERATOR=cpu``, set here for
the rank processes) over the gloo group the benchmark already made. DeepSpeed compiles its CPU
kernels (the shared-memory all-reduce, ``FusedAdam``/``DeepSpeedCPUAdam``) with ninja the first
time they are used, into ``~/.cache/torch_extensions`` (minutes on 2 cores; later runs load them),
so the first run of a benchmark is slow: that happens before the warm-up steps and is not timed.
When DeepSpeed is missing or cannot run, each benchmark prints one line saying why and goes on
without it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import subprocess
import sys
import warnings

import torch

__all__ = ["unavailable", "rank_env", "ds_config", "deepspeed_step", "import_deepspeed", "ratio_line"]

_REASON: list[str | None] = []


def rank_env() -> dict[str, str]:
    """Environment for the rank processes: DeepSpeed's CPU accelerator where there is no CUDA."""
    return {} if torch.cuda.is_available() else {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def unavailable() -> str | None:
    """None when DeepSpeed can be imported here; else the reason, for the benchmark's output. The import
    is tried in a child process (it is slow and sets process-wide state the benchmark does not need)."""
    if _REASON:
        return _REASON[0]
    if importlib.util.find_spec("deepspeed") is None:
        reason = ("DeepSpeed baseline skipped: `deepspeed` is not installed (pip install deepspeed "
                  "torch==2.13.0, or run `nox -s bench`)")
    else:
        env = {**os.environ, **rank_env()}
        probe = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"],
                               capture_output=True, text=True, env=env, timeout=600)
        if probe.returncode == 0:
            reason = None
        else:
            last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
            reason = f"DeepSpeed baseline skipped: `import deepspeed` fails here: {last}"
    _REASON.append(reason)
    return reason


def import_deepspeed():
    """In a rank process: import DeepSpeed quietly and attach it to the existing process group."""
    for key, value in rank_env().items():
        os.environ.setdefault(key, value)
    # DeepSpeed calls torch.distributed APIs torch 2.13 marks deprecated, once per call site
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    with contextlib.redirect_stdout(io.StringIO()):
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    return deepspeed


def ds_config(config: dict) -> dict:
    """Our benchmark config as DeepSpeed takes it: DeepSpeed divides by ``steps_per_print``, so 0
    (our "never") becomes a very large number."""
    out = copy.deepcopy(config)
    if not out.get("steps_per_print"):
        out["steps_per_print"] = 10**9
    out.setdefault("wall_clock_breakdown", False)
    return out


def deepspeed_step(base: torch.nn.Module, batches, config: dict):
    """DeepSpeed's engine over a copy of ``base`` built from ``config`` (forward, backward, step, as
    ``_common.engine_step`` does for ours); ``step.engine`` is the engine."""
    deepspeed = import_deepspeed()
    model = copy.deepcopy(base)
    with contextlib.redirect_stdout(io.StringIO()):
        engine = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(config))[0]

    def step(i):
        x, y = batches[i % len(batches)]
        engine.backward(engine(x, y))
        engine.step()

    step.engine = engine
    return step


def ratio_line(label: str, ours: float, theirs: float | None, target: str = "<= 1.0") -> str:
    """``ratio <label>: 0.953  (target <= 1.0)``, or why there is no DeepSpeed figure."""
    if theirs is None:
        return f"ratio {label}: n/a ({unavailable() or 'DeepSpeed did not run'})"
    return f"ratio {label}: {ours / theirs:.3f}  (target {target})"
