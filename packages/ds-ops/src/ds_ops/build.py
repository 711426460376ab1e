"""Just-in-time builds of the C++ kernels, cached per source, torch version and CPU.

Nothing compiles at install time. The first call of a C++ kernel builds its extension with
``torch.utils.cpp_extension.load`` (ninja) into ``$DS_OPS_CACHE/<name>-<key>/`` (default
``~/.cache/ds_ops``), where the key hashes the sources, torch version, Python ABI, compiler and the
ISA flags picked from ``/proc/cpuinfo`` (``-mavx512f`` or ``-mavx2``, plus ``-fopenmp``). A
``fcntl.flock`` on ``<name>-<key>.lock`` makes concurrent ranks build once: the first builds, the
others wait and load its result.

After a build we write a manifest naming the ``.so`` and its sha256. A cached ``.so`` whose manifest
is missing or whose checksum differs (a truncated copy, a crash mid-link) is wiped and rebuilt, and so is one that fails to load.

When a build cannot happen (no compiler, no ninja, an unwritable cache dir, a compile error,
``DS_OPS_JIT=0``) :func:`load_or_none` warns once, naming why, and returns ``None``; the op then
runs its pure-PyTorch default. :func:`describe` says what would happen without compiling anything,
for ``ds report``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

from ds_core.errors import DSError

__all__ = [
    "EXTENSIONS",
    "BuildError",
    "BuildWarning",
    "cache_root",
    "cpu_isa",
    "isa_flags",
    "toolchain",
    "cached_library",
    "load",
    "load_or_none",
    "describe",
    "reset",
]

CSRC = Path(__file__).parent / "csrc"

# extension name -> its C++ sources (relative to csrc/)
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "cpu_optim": ("cpu_optim.cpp",),
    "aio": ("aio.cpp",),
    "woq": ("woq.cpp",),
    "gemv": ("gemv.cpp",),
}

MANIFEST = "ds_ops_build.json"  # {"library": "<file>.so", "sha256": "..."}, written after a build
CACHE_ENV = "DS_OPS_CACHE"
JIT_ENV = "DS_OPS_JIT"

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


class BuildError(DSError, RuntimeError):
    """A C++ extension could not be built or loaded; the message says why and what to do."""


class BuildWarning(RuntimeWarning):
    """Issued once per extension when its build fails and the pure-PyTorch default runs instead."""


def cache_root() -> Path:
    """``$DS_OPS_CACHE`` or ``~/.cache/ds_ops``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ds_ops"


@cache
def cpu_isa() -> str:
    """``avx512``, ``avx2`` or ``generic`` from the flags in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if {"avx512f", "avx512bw", "avx512vl", "fma", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "generic"


def isa_flags(isa: str | None = None) -> list[str]:
    isa = isa or cpu_isa()
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
                "-mprefer-vector-width=512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _cflags() -> list[str]:
    # -ffp-contract=off: fuse multiply-adds only where we write std::fma, as ATen does, so results
    # match torch.optim. -fno-math-errno lets sqrt vectorize without changing its value.
    return ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *isa_flags()]


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


@cache
def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def toolchain() -> dict[str, str | None]:
    """What a build would use here: compiler, its version, ninja and the ISA. Runs no build."""
    cxx = _compiler()
    ninja = shutil.which("ninja")
    return {
        "compiler": cxx,
        "compiler_version": _compiler_version(cxx) if cxx else None,
        "ninja": ninja,
        "isa": cpu_isa(),
    }


def _missing_tool() -> str | None:
    if os.environ.get(JIT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"C++ kernels are disabled by {JIT_ENV}={os.environ[JIT_ENV]}"
    tools = toolchain()
    if tools["compiler"] is None:
        return (f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r} on PATH); "
                "install g++ or set CXX")
    if tools["ninja"] is None:
        return "ninja not found on PATH; pip install ninja"
    return None


def _key(name: str) -> str:
    import torch

    h = hashlib.sha256()
    for src in EXTENSIONS[name]:
        h.update(src.encode())
        h.update((CSRC / src).read_bytes())
    tools = toolchain()
    for part in (torch.__version__, sys.implementation.cache_tag, tools["compiler_version"] or "",
                 " ".join(_cflags())):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def _paths(name: str) -> tuple[str, Path]:
    key = _key(name)
    return f"ds_ops_{name}_{key}", cache_root() / f"{name}-{key}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(build_dir: Path) -> Path | None:
    """The built library recorded in ``build_dir``'s manifest, if its checksum still matches."""
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
        so = build_dir / manifest["library"]
        return so if so.is_file() and manifest["sha256"] == _sha256(so) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_library(name: str) -> Path | None:
    """Path of extension ``name``'s intact cached build for this torch/CPU/source, else ``None``."""
    return _cached(_paths(name)[1])


def _import(so: Path) -> ModuleType:
    import torch  # noqa: F401  (the extension links against libtorch; load it first)

    module_name = so.name.split(".", 1)[0]
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(so))
    spec = importlib.util.spec_from_file_location(module_name, so, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _writable_root() -> Path:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BuildError(
            f"the kernel cache dir {root} is not writable ({exc.strerror or exc}); set {CACHE_ENV} "
            "to a writable directory (e.g. a node-local path)"
        ) from exc
    return root


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _compile(name: str, module_name: str, build_dir: Path, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    shutil.rmtree(build_dir, ignore_errors=True)  # stale objects could be as corrupt as the .so
    build_dir.mkdir(parents=True)
    try:
        module = cpp_extension.load(
            name=module_name,
            sources=[str(CSRC / s) for s in EXTENSIONS[name]],
            extra_cflags=_cflags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's message is in exc; keep its tail readable
        detail = str(exc).strip().splitlines()
        tail = " | ".join(detail[-6:]) if detail else type(exc).__name__
        raise BuildError(
            f"building C++ extension {name!r} in {build_dir} failed: {tail}; rerun with "
            f"`ds ops build --verbose` to see the compiler output"
        ) from exc
    so = _built_library(module, module_name, build_dir)
    (build_dir / MANIFEST).write_text(json.dumps({"library": so.name, "sha256": _sha256(so)}) + "\n")
    return module


def _built_library(module: ModuleType, module_name: str, build_dir: Path) -> Path:
    """The library this build wrote into ``build_dir``, which the manifest must name.

    torch may version the file (``name_v1.so``) when one process builds a name twice, and the
    interpreter hands back the module it already imported under that name (``module.__file__`` in
    another cache dir) when the same extension was loaded from elsewhere first: neither is the file
    to record, so take the newest ``name*.so`` in ``build_dir``.
    """
    so = Path(getattr(module, "__file__", "") or "")
    if so.parent.resolve() == build_dir.resolve() and so.is_file():
        return so
    built = [p for p in build_dir.glob(f"{module_name}*.so") if p.is_file()]
    if not built:
        raise BuildError(f"building C++ extension {module_name!r} left no library in {build_dir}; "
                         "rerun with `ds ops build --verbose` to see the compiler output")
    return max(built, key=lambda p: p.stat().st_mtime_ns)


def load(name: str, verbose: bool = False) -> ModuleType:
    """Build (if needed) and import extension ``name``; raise :class:`BuildError` if impossible."""
    if name not in EXTENSIONS:
        raise BuildError(f"unknown C++ extension {name!r}; known: {', '.join(EXTENSIONS)}")
    with _lock:
        if name in _loaded:
            return _loaded[name]
        reason = _missing_tool()
        if reason:
            raise BuildError(reason)
        root = _writable_root()
        module_name, build_dir = _paths(name)
        with _file_lock(root / f"{build_dir.name}.lock"):
            module = None
            so = _cached(build_dir)
            if so is not None:
                try:
                    module = _import(so)
                except ImportError:
                    module = None  # intact but unloadable (e.g. a changed libtorch): rebuild
            if module is None:
                module = _compile(name, module_name, build_dir, verbose)
        _loaded[name] = module
        _failed.pop(name, None)
        return module


def load_or_none(name: str) -> ModuleType | None:
    """The extension, or ``None`` after warning once (per process) why it could not be built."""
    module = _loaded.get(name)
    if module is not None:
        return module
    if name in _failed:
        return None
    try:
        return load(name)
    except BuildError as exc:
        _failed[name] = str(exc)
        warnings.warn(f"ds_ops: {exc}; using the pure-PyTorch implementation instead",
                      BuildWarning, stacklevel=3)
        return None


def describe(name: str) -> str:
    """One line for ``ds report``: loaded / cached / buildable / failed / unavailable, and why."""
    if name in _loaded:
        return "loaded"
    if name in _failed:
        return f"failed: {_failed[name]}"
    reason = _missing_tool()
    if reason:
        return f"unavailable: {reason}"
    tools = toolchain()
    try:
        so = cached_library(name)
        if so is not None:
            return f"built (cached in {so.parent})"
    except OSError:
        pass
    return f"buildable on first use ({tools['compiler_version']}, ninja, {tools['isa']})"


def reset() -> None:
    """Forget loaded and failed extensions in this process (tests that change the cache use it)."""
    with _lock:
        _loaded.clear()
        _failed.clear()
    cpu_isa.cache_clear()
