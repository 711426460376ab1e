"""The import-graph check run by ``nox -s lint`` (tools/check_imports.py): the packages pass it, and it
finds a cycle (lazy imports included) and a sibling import in a made-up tree."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "check_imports.py"


def _run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True,
                          timeout=120)


def test_the_packages_have_no_cycles_and_no_sibling_imports():
    out = _run(ROOT / "packages")
    assert out.returncode == 0, out.stdout
    assert "0 problem(s)" in out.stdout


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_lazy_cycle_and_a_sibling_import_are_reported(tmp_path):
    _write(tmp_path, {
        "ds-core/src/ds_core/__init__.py": "",
        "ds-core/src/ds_core/a.py": "from . import b\n",
        "ds-core/src/ds_core/b.py": "def f():\n    from .a import x\n",  # lazy: still a cycle
        "ds-core/src/ds_core/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
        "ds-core/src/ds_core/d.py": "from . import c\n",  # TYPE_CHECKING-only: not a cycle
        "ds-zero/src/ds_zero/__init__.py": "import ds_pipe.engine\n",
        "ds-pipe/src/ds_pipe/__init__.py": "",
        "ds-pipe/src/ds_pipe/engine.py": "import ds_core.a\n",
        "ds-infer/src/ds_infer/__init__.py": "from ds_parallel import layers\n",
        "ds-parallel/src/ds_parallel/__init__.py": "",
        "ds-parallel/src/ds_parallel/layers.py": "",
    })
    out = _run(tmp_path)
    assert out.returncode == 1
    assert "import cycle ds_core.a -> ds_core.b -> ds_core.a" in out.stdout
    assert "ds_core.c -> ds_core.d" not in out.stdout
    assert "ds_zero imports ds_pipe.engine: package ds_zero may import only itself and ds_core" in out.stdout
    assert "ds_infer imports" not in out.stdout  # the one allowed sibling import
    assert "2 problem(s)" in out.stdout
