"""Flops profiling and the run report around the log line (TFLOPs, MFU, ETA, progress bar)."""

from __future__ import annotations

from .flops import (
    PEAK_TFLOPS,
    FlopsProfiler,
    FlopsProfilerConfig,
    ModelProfile,
    ModuleProfile,
    format_profile,
    get_model_profile,
    peak_tflops,
)
from .report import RunReport, format_eta, total_steps_from_config

__all__ = ["FlopsProfiler", "FlopsProfilerConfig", "ModelProfile", "ModuleProfile", "get_model_profile",
           "format_profile", "peak_tflops", "PEAK_TFLOPS", "RunReport", "format_eta", "total_steps_from_config"]
