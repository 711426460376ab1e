"""The GPU proof script cannot rot: without a CUDA device it runs as a dry run (every cuda test
collected and skipped with a reason, every benchmark model built at a tiny size and stepped once on
the CPU) and exits 0, writing the same result files a GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: run benchmarks/gpu/run.py itself")
def test_gpu_script_dry_run_exits_zero_and_writes_results(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no CUDA device here: dry run" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["env"]["dry_run"] is True and not results["errors"]
    assert results["tests"]["skipped"] > 0 and results["tests"]["passed"] == results["tests"]["failed"] == 0
    sections = {row["section"] for row in results["rows"]}
    assert {"kernels", "engine", "zero3"} <= sections, sections
    assert "DRY RUN" in (tmp_path / "results.md").read_text()
