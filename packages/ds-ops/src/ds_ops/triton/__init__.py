"""Triton kernels behind the ``ds_ops`` custom ops (the ``ds-ops[cuda]`` extra).

Triton is optional, so nothing here imports it at package import time. The op modules
(``ds_ops.fused_adam``, ``ds_ops.quant``, ``ds_ops.norm``) register a "cuda" kernel that asks
:func:`available` first and falls back to the pure-PyTorch default when Triton is missing.

The kernel modules (``adam``, ``quant``, ``norm``) import Triton at their top and expose plain
launch functions that take tensors on any device Triton accepts. Tests run them on CPU tensors
with ``TRITON_INTERPRET=1`` set before Triton is imported: Triton reads that variable when a
kernel is decorated, so it must be in the environment before these modules are first imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

__all__ = ["available", "unavailable_reason", "status"]


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; install the extra with `pip install ds-ops[cuda]`"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install is reported, not fatal
        return f"triton failed to import ({type(exc).__name__}: {exc}); reinstall `ds-ops[cuda]`"
    return None


def available() -> bool:
    """True when ``import triton`` works, so the "cuda" kernels launch Triton instead of the default."""
    return unavailable_reason() is None


def status() -> str:
    """One line for ``ds report``: the Triton version, or why the default runs instead.

    Reads the installed version from package metadata rather than importing Triton (a fifth of a
    second), so reports stay fast; an install that fails to import shows up on the first kernel call.
    """
    if importlib.util.find_spec("triton") is None:
        return f"PyTorch default runs: {unavailable_reason()}"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return f"ready (triton {version}, compiled on first call)"
