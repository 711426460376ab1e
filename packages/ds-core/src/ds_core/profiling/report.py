"""What the engine adds around a run's log line: the flops profile, TFLOPs and MFU, an ETA, a progress bar.

:class:`RunReport` is the engine's one object for these (``engine.run_report``):

- ``forward(step, module, call)`` runs a forward, under :class:`~ds_core.profiling.flops.FlopsProfiler`
  when it is the first forward of ``flops_profiler.profile_step`` (config ``flops_profiler.enabled``);
- ``after_step(step, seconds_per_step)`` returns the extra log-line fields — ``TFLOPs`` (this rank's
  achieved training FLOPS, from the profile), ``MFU`` (when the device's peak is known, see
  :func:`~ds_core.profiling.flops.peak_tflops`) and ``ETA`` (when the run's length is known:
  ``total_steps``, taken from the scheduler's ``total_num_steps`` or set by the user) — prints the
  profile once, and advances the progress bar;
- ``print(line)`` prints a log line (through the bar when one is shown, so the bar stays at the bottom).

The progress bar (``tqdm``, when installed) is shown on rank 0 when stdout is a terminal;
``DS_PROGRESS_BAR=1`` forces it on, ``0`` off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .flops import FlopsProfiler, FlopsProfilerConfig, ModelProfile, _emit, format_profile, peak_tflops

__all__ = ["RunReport", "format_eta", "total_steps_from_config"]


def format_eta(seconds: float) -> str:
    """``1:02:03`` (hours:minutes:seconds), ``3d 4:05:06`` past a day."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def total_steps_from_config(raw: dict) -> int | None:
    """The run's length in optimizer steps when the config says it (a decaying schedule's
    ``scheduler.params.total_num_steps``), else None."""
    params = ((raw or {}).get("scheduler") or {}).get("params") or {}
    value = params.get("total_num_steps")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _want_bar(rank: int) -> bool:
    forced = os.environ.get("DS_PROGRESS_BAR", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if rank != 0:
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


class RunReport:
    """See the module docstring."""

    def __init__(self, raw_config: dict, rank: int = 0, device: torch.device | None = None,
                 gradient_accumulation_steps: int = 1) -> None:
        self.config = FlopsProfilerConfig.from_raw((raw_config or {}).get("flops_profiler"))
        self.rank, self.device = rank, device
        self.gas = max(1, int(gradient_accumulation_steps or 1))
        self.total_steps: int | None = total_steps_from_config(raw_config)
        self.profile: ModelProfile | None = None
        self._profiled_step: int | None = None
        self._printed = False
        self._bar = None
        self._bar_wanted = _want_bar(rank)
        self._peak = peak_tflops(device) if self.config.enabled else None

    # -- the forward -------------------------------------------------------------------------------
    def forward(self, step: int, module: torch.nn.Module, call):
        """``call()`` (the module's forward), profiled when ``step`` is the profile step's first forward."""
        if not self.config.enabled or self.profile is not None or step != self.config.profile_step:
            return call()
        with FlopsProfiler(module, self.device) as prof:
            out = call()
        self.profile, self._profiled_step = prof.profile, step
        return out

    # -- after an optimizer step -------------------------------------------------------------------
    def train_flops(self) -> float | None:
        """This rank's training FLOPs per optimizer step (see ``flops.py``), None before profiling."""
        if self.profile is None:
            return None
        return self.profile.flops * (3.0 + self.config.recompute_fwd_factor) * self.gas

    def after_step(self, step: int, seconds_per_step: float | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        flops = self.train_flops()
        if flops is not None and seconds_per_step:
            tflops = flops / seconds_per_step / 1e12
            fields["TFLOPs"] = tflops
            if self._peak:
                fields["MFU"] = f"{tflops / self._peak:.1%}"
        if self.total_steps and seconds_per_step and step < self.total_steps:
            fields["ETA"] = format_eta((self.total_steps - step) * seconds_per_step)
        if self.profile is not None and not self._printed and self.rank == 0:
            self._printed = True
            text = format_profile(self.profile, self.config.module_depth, self.config.top_modules,
                                  self.config.detailed, step=self._profiled_step, step_seconds=seconds_per_step,
                                  train_flops=flops, peak=self._peak)
            if self.config.output_file:
                _emit(text, self.config.output_file)
            else:
                self.print(text)
        self._advance(step)
        return fields

    # -- the progress bar --------------------------------------------------------------------------
    def _advance(self, step: int) -> None:
        if not self._bar_wanted:
            return
        if self._bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._bar_wanted = False
                return
            self._bar = tqdm(total=self.total_steps, initial=step - 1, unit="step", dynamic_ncols=True,
                             desc="ds", file=sys.stdout)
        self._bar.update(step - self._bar.n)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
