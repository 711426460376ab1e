"""Prepare ``.whl/`` for a GPU machine with no network: wheels of our packages and of what its image
lacks (pydantic and its dependencies), for CPython 3.12 on manylinux x86-64.

    python benchmarks/gpu/prepare.py [--dest .whl] [--python-version 3.12]

Run it where pip reaches PyPI, right before sending the tree: our wheels are built from the working
tree as it is (pure Python, nothing compiled). On the GPU machine:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benchmarks/gpu/run.py
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# What the GPU image lacks: pydantic's exact pins (pydantic_core must match pydantic).
MISSING = ["pydantic", "pydantic_core", "annotated_types", "typing_inspection"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    dest = Path(args.dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)

    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *plat,
                    "-d", str(dest), *pins], check=True)
    # our packages, and the test-only plugin packages the suite installs (e.g. a test accelerator)
    packages = sorted(glob.glob(str(ROOT / "packages" / "*")))
    packages += sorted(str(Path(p).parent) for p in glob.glob(str(ROOT / "tests" / "**" / "plugins" / "*" / "pyproject.toml"),
                                                              recursive=True))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), *packages],
                   check=True)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print("\n".join(w.name for w in wheels))
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}")


if __name__ == "__main__":
    main()
