"""Training metrics out of the engine: monitor backends, the log line and throughput.

:class:`Monitor` fans ``(name, value, step)`` events out to the backends the config enables —
``csv_monitor`` (always available), ``tensorboard`` (needs the ``tensorboard`` package) and
``wandb`` (needs ``wandb``). A backend whose package is missing is a :class:`ConfigError` when the
monitor is built, on every rank, so a run fails before its first step instead of after hours, and
no rank waits on another that died. Only rank 0 writes.

The CSV layout is DeepSpeed's: one file per metric, ``<output_path>/<job_name>/<name>.csv`` with a
``step,<last part of name>`` header, so scripts that read DeepSpeed's CSVs read ours. Each
``write_events`` call is flushed, so a crash keeps everything written before it.

:func:`format_log_line` renders the ``steps_per_print`` line; :class:`Throughput` measures samples/s
and tokens/s over a window of optimizer steps (the first, warm-up step excluded) and reads peak
memory from the accelerator.
"""

from __future__ import annotations

import collections
import csv
import importlib
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

from pydantic import ValidationError

from .. import comm
from ..config.sections import CSVMonitorConfig, TensorBoardConfig, WandbConfig
from ..errors import ConfigError, closest

__all__ = [
    "Event",
    "Monitor",
    "CSVBackend",
    "TensorBoardBackend",
    "WandbBackend",
    "format_log_line",
    "Throughput",
]

Event = tuple[str, float, int]  # (name, value, step)


def _require(package: str, section: str) -> None:
    """Import ``package`` or raise a ConfigError naming what to pip install."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"{section}.enabled is true but the {package!r} package is not installed; "
            f"pip install {package}, or set {section}.enabled to false"
        ) from None


def _log_dir(output_path: str, job_name: str, default_root: str) -> str:
    # DeepSpeed writes under ~/<backend> when output_path is empty; we use the working directory,
    # which is where a user looks first and what a cluster job usually has write access to.
    return os.path.join(output_path or default_root, job_name)


class CSVBackend:
    """One CSV per metric under ``<output_path>/<job_name>/`` (DeepSpeed's layout).

    ``Train/Samples/train_loss`` goes to ``Train_Samples_train_loss.csv`` with the header
    ``step,train_loss``. Re-opening an existing file (a resumed run) appends without a second header.
    """

    def __init__(self, config: CSVMonitorConfig) -> None:
        self.log_dir = _log_dir(config.output_path, config.job_name, "csv_monitor")
        os.makedirs(self.log_dir, exist_ok=True)
        self._files: dict[str, tuple[IO[str], Any]] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.log_dir, name.replace("/", "_").replace(" ", "_") + ".csv")

    def _writer(self, name: str):
        entry = self._files.get(name)
        if entry is None:
            path = self.path(name)
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            f = open(path, "a", newline="")  # noqa: SIM115 - held open across writes, closed in close()
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", name.rsplit("/", 1)[-1]])
            entry = self._files[name] = (f, writer)
        return entry

    def write_events(self, events: Iterable[Event]) -> None:
        touched = set()
        for name, value, step in events:
            f, writer = self._writer(name)
            writer.writerow([int(step), float(value)])
            touched.add(f)
        for f in touched:
            f.flush()

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


class TensorBoardBackend:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` in ``<output_path>/<job_name>/``."""

    def __init__(self, config: TensorBoardConfig) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = _log_dir(config.output_path, config.job_name, "tensorboard")
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events: Iterable[Event]) -> None:
        for name, value, step in events:
            self.writer.add_scalar(name, float(value), int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A Weights & Biases run (``project``, ``group``, ``team`` as entity).

    Events of one step are sent in one ``wandb.log`` call, in step order, because wandb drops a
    log whose step is lower than one it has already seen. Set ``WANDB_MODE=offline`` to log
    without a network; ``WANDB_DIR`` picks where the run's files go.
    """

    def __init__(self, config: WandbConfig) -> None:
        _require("wandb", "wandb")
        import wandb

        self.run = wandb.init(project=config.project, group=config.group, entity=config.team)

    def write_events(self, events: Iterable[Event]) -> None:
        by_step: dict[int, dict[str, float]] = collections.defaultdict(dict)
        for name, value, step in events:
            by_step[int(step)][name] = float(value)
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step)

    def close(self) -> None:
        self.run.finish()


def _section(value: Any, model: type, name: str):
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if isinstance(value, Mapping):
        try:
            return model.model_validate(dict(value))
        except ValidationError as exc:
            fields = list(model.model_fields)
            problems = [
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                + (closest(str(e["loc"][-1]), fields) if e["type"] == "extra_forbidden" else "")
                for e in exc.errors()
            ]
            raise ConfigError(f"{name}: " + "; ".join(problems)) from None
    raise ConfigError(
        f"{name}={value!r} must be a {model.__name__}, a dict of its keys or None; "
        f"pass config.{name} from a parsed DSConfig"
    )


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Monitor:
    """Fan-out of metric events to every enabled backend; only ``rank`` 0 writes.

    Pass a parsed ``DSConfig`` (or its full dict), or the sections as keywords (section objects or
    dicts); a keyword overrides the same section of ``config``. ``rank=None`` asks
    ``torch.distributed`` (0 when it is not initialized).
    """

    def __init__(self, config: Any = None, *, csv_monitor: Any = None, tensorboard: Any = None,
                 wandb: Any = None, rank: int | None = None) -> None:
        if isinstance(config, Mapping):
            config = {k: config.get(k) for k in ("csv_monitor", "tensorboard", "wandb")}
            get = config.get
        elif config is not None:
            def get(key: str) -> Any:
                return getattr(config, key)
        else:
            def get(key: str) -> Any:
                return None
        self.csv_config = _section(csv_monitor if csv_monitor is not None else get("csv_monitor"),
                                   CSVMonitorConfig, "csv_monitor")
        self.tensorboard_config = _section(tensorboard if tensorboard is not None else get("tensorboard"),
                                           TensorBoardConfig, "tensorboard")
        self.wandb_config = _section(wandb if wandb is not None else get("wandb"), WandbConfig, "wandb")
        self.rank = _default_rank() if rank is None else rank

        # Every rank checks the packages, so a missing one fails all ranks alike.
        if self.tensorboard_config.enabled:
            _require("tensorboard", "tensorboard")
        if self.wandb_config.enabled:
            _require("wandb", "wandb")

        self.backends: list[Any] = []
        if self.rank == 0:
            if self.csv_config.enabled:
                self.backends.append(CSVBackend(self.csv_config))
            if self.tensorboard_config.enabled:
                self.backends.append(TensorBoardBackend(self.tensorboard_config))
            if self.wandb_config.enabled:
                self.backends.append(WandbBackend(self.wandb_config))

    @property
    def enabled(self) -> bool:
        """True when this rank writes somewhere (the engine can skip building events otherwise)."""
        return bool(self.backends)

    def write_events(self, events: list[Event]) -> None:
        """Write ``(name, value, step)`` events to every backend (a no-op off rank 0)."""
        if not self.backends:
            return
        events = [(str(n), float(v), int(s)) for n, v, s in events]
        for backend in self.backends:
            backend.write_events(events)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = [type(b).__name__.removesuffix("Backend").lower() for b in self.backends]
        return f"Monitor(rank={self.rank}, backends={names})"


# -- the steps_per_print line ------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    """Floats to 4 decimals, or 3 significant digits in e-notation when very large or small."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.3e}"
    return f"{value:.4f}"


def format_log_line(step: int, loss: float | None, lr: float | list[float] | None,
                    grad_norm: float | None, samples_per_sec: float | None,
                    tokens_per_sec: float | None = None, **extra: Any) -> str:
    """The ``steps_per_print`` line: ``step 10 | loss 2.3456 | lr 1.000e-04 | grad_norm 0.8123 | ...``.

    Values that are ``None`` (no grad norm without clipping, no throughput during warm-up) are
    left out. ``lr`` may be a list (one per parameter group). ``extra`` keys follow in call order.
    """
    parts = [f"step {step}"]
    fields: list[tuple[str, Any]] = [("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                                     ("samples/s", samples_per_sec), ("tokens/s", tokens_per_sec)]
    fields += list(extra.items())
    for key, value in fields:
        if value is None:
            continue
        if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
            value = value.item()
        if key == "lr":
            text = ("[" + ", ".join(f"{v:.3e}" for v in value) + "]" if isinstance(value, (list, tuple))
                    else f"{value:.3e}")
        elif key in ("samples/s", "tokens/s"):
            text = f"{value:,.1f}"
        else:
            text = _fmt(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


# -- throughput and memory ---------------------------------------------------------------------------

class Throughput:
    """Samples/s and tokens/s over the last ``window`` optimizer steps, plus peak memory.

    Call :meth:`update` once per optimizer step with the samples (and tokens) that step consumed,
    globally or per rank as you want them reported. The interval of a step is the wall time since
    the previous ``update`` (data loading included, which is what the user waits for); the first
    ``warmup_steps`` steps (compilation, allocator growth, first data fetch) are not counted.
    """

    def __init__(self, window: int = 50, warmup_steps: int = 1, accelerator=None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window < 1:
            raise ConfigError(f"Throughput window {window!r} must be >= 1 optimizer step")
        if warmup_steps < 0:
            raise ConfigError(f"Throughput warmup_steps {warmup_steps!r} must be >= 0")
        self.window = window
        self.warmup_steps = warmup_steps
        self._accelerator = accelerator
        self._clock = clock
        self._steps: collections.deque[tuple[float, int, int | None]] = collections.deque(maxlen=window)
        self.steps_seen = 0
        self._last = clock()

    def start(self) -> None:
        """Restart the clock (e.g. after evaluation or a checkpoint save, to keep them out)."""
        self._last = self._clock()

    def update(self, samples: int, tokens: int | None = None) -> None:
        now = self._clock()
        interval, self._last = now - self._last, now
        self.steps_seen += 1
        if self.steps_seen > self.warmup_steps:
            self._steps.append((interval, samples, tokens))

    @property
    def measured_steps(self) -> int:
        return len(self._steps)

    @property
    def samples_per_sec(self) -> float | None:
        """None until a step past warm-up has been measured."""
        seconds = sum(s[0] for s in self._steps)
        return sum(s[1] for s in self._steps) / seconds if self._steps and seconds > 0 else None

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of the measured steps in the window; None until one is measured."""
        return sum(s[0] for s in self._steps) / len(self._steps) if self._steps else None

    @property
    def tokens_per_sec(self) -> float | None:
        """None until measured, or when any step in the window was updated without tokens."""
        if not self._steps or any(s[2] is None for s in self._steps):
            return None
        seconds = sum(s[0] for s in self._steps)
        return sum(s[2] for s in self._steps) / seconds if seconds > 0 else None

    # memory
    @property
    def accelerator(self):
        if self._accelerator is None:
            from ..accelerator import get_accelerator

            self._accelerator = get_accelerator()
        return self._accelerator

    def peak_memory(self) -> int:
        """Peak bytes allocated on this rank's device (peak RSS on a CPU run)."""
        return int(self.accelerator.max_memory_allocated())

    def reset_peak_memory(self) -> None:
        """Restart the peak (device runs; a process's peak RSS cannot be reset)."""
        self.accelerator.reset_peak_memory_stats()

    def peak_memory_per_rank(self, group=None) -> list[int]:
        """Every rank's peak bytes (a collective when torch.distributed is initialized)."""
        import torch.distributed as dist

        mine = self.peak_memory()
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        import torch

        # a tensor collective: all_gather_object needs numpy, which ds-core does not depend on
        out = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
        comm.all_gather(out, torch.tensor([mine], dtype=torch.int64), group=group)
        return [int(v) for v in out]

    def events(self, step: int, prefix: str = "Train/Samples") -> list[Event]:
        """Monitor events for what has been measured (throughput and this rank's peak memory)."""
        out: list[Event] = []
        if self.samples_per_sec is not None:
            out.append((f"{prefix}/samples_per_sec", self.samples_per_sec, step))
        if self.tokens_per_sec is not None:
            out.append((f"{prefix}/tokens_per_sec", self.tokens_per_sec, step))
        out.append((f"{prefix}/peak_memory_gib", self.peak_memory() / 2**30, step))
        return out
