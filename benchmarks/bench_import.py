"""Import cost of ds_core over torch, `ds report` wall time, and what `pip install ds-core` pulls.

    python benchmarks/bench_import.py

Each figure is the median of several fresh interpreters. ds_core's own cost is timed inside the
interpreter after torch has loaded: the wall time of loading torch varies by more than 100 ms between
runs, which would drown the difference (targets: at most 100 ms over `import torch`; `ds report`
under 2 s).
"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import statistics
import subprocess
import sys
import time


def _median_seconds(cmd: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _in_process_ms(code: str) -> float:
    """Milliseconds ``code`` takes in a fresh interpreter that has already imported torch (so the
    noise of loading torch itself does not enter the difference)."""
    timed = f"import torch, time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", timed], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1]) * 1e3


def main() -> None:
    py = sys.executable
    _median_seconds([py, "-c", "import torch"], runs=2)  # warm the file cache
    torch_only = _median_seconds([py, "-c", "import torch"])
    print(f"import torch (fresh interpreter, for scale)  : {torch_only * 1e3:7.0f} ms")
    bare = statistics.median(_in_process_ms("import ds_core") for _ in range(7))
    full = statistics.median(_in_process_ms("import ds_core; ds_core.config; ds_core.comm") for _ in range(7))
    print(f"timed after `import torch`, in-process  : import ds_core {bare:.1f} ms; "
          f"+ config and comm {full:.1f} ms (target <= 100 ms)")
    ds = shutil.which("ds")
    if ds:
        report = _median_seconds([ds, "report"], runs=3)
        print(f"ds report                            : {report * 1e3:7.0f} ms  (target < 2000 ms)")
    requires = [r for r in (metadata.requires("ds-core") or []) if "extra ==" not in r]
    print(f"ds-core requires                     : {', '.join(requires)}")
    compiled = [str(f) for f in (metadata.files("ds-core") or []) if str(f).endswith((".so", ".pyd", ".c", ".cpp"))]
    print(f"compiled files in the ds-core install: {len(compiled)}")


if __name__ == "__main__":
    main()
