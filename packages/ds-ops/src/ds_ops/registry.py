"""The op catalogue and the ``ds.ops`` entry point of this package.

Every op lives in the ``ds_ops`` torch.library namespace, defined once with a pure-PyTorch default
(runs on any device) and per-device kernels registered beside it. Op modules are listed in
:data:`OP_MODULES`; :func:`register` (the ``ds.ops`` entry point) imports them, which defines the ops
and registers their kernels but compiles nothing: C++ kernels build on their first call.

An op module that cannot be imported (an optional dependency such as triton is missing, or it is
broken) is skipped and shows up in ``ds report``; it never stops the other ops from loading.

Third-party accelerators add a kernel for their device from their own ``ds.ops`` entry point::

    from ds_ops.registry import register_kernel

    def register():
        register_kernel("adam_step", "hpu", my_hpu_adam_step)   # same signature as the op

Callers never import kernels: they use ``torch.ops.ds_ops.<name>`` (via ``ds_core.ops.get_op``).
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ds_core.errors import DSError

__all__ = [
    "NAMESPACE",
    "OP_MODULES",
    "OpInputError",
    "OpInfo",
    "OpsProvider",
    "custom_op",
    "define_op",
    "register_kernel",
    "record_kernel",
    "register_optimizer",
    "catalogue",
    "register",
]

NAMESPACE = "ds_ops"

# Modules that define ops on import. Kernel authors append theirs; a module whose import fails is
# reported by report_rows() and skipped.
OP_MODULES: list[str] = [
    "ds_ops.cpu_optim",
    "ds_ops.aio",
    "ds_ops.fused_adam", "ds_ops.quant", "ds_ops.norm", "ds_ops.paged_attention",
    "ds_ops.woq", "ds_ops.gemv",
]


class OpInputError(DSError, ValueError):
    """An op was called with buffers it cannot use (size, dtype, layout); says which and why."""


StatusFn = Callable[[], str]


@dataclass
class OpInfo:
    """One op: its default and the kernels registered per device, each with a status probe."""

    name: str
    module: str
    kernels: dict[str, tuple[str, StatusFn]] = field(default_factory=dict)


_lock = threading.RLock()
_ops: dict[str, OpInfo] = {}
_optimizers: dict[str, type] = {}
_module_errors: dict[str, str] = {}
_provider: OpsProvider | None = None


def _qualified(name: str) -> str:
    return name if "::" in name else f"{NAMESPACE}::{name}"


def _short(name: str) -> str:
    return name.split("::", 1)[1] if "::" in name else name


def custom_op(name: str, *, mutates_args: Iterable[str] | str = (), schema: str | None = None):
    """``torch.library.custom_op`` in the ``ds_ops`` namespace that also records the op here.

    The decorated function is the pure-PyTorch default, used on every device with no kernel.
    """
    import torch

    def wrap(fn: Callable[..., Any]):
        op = torch.library.custom_op(_qualified(name), mutates_args=mutates_args, schema=schema)(fn)
        with _lock:
            _ops.setdefault(_short(name), OpInfo(_short(name), fn.__module__))
        return op

    return wrap


_libraries: list[Any] = []  # the torch.library.Library objects of define_op (they must stay alive)


def define_op(name: str, schema: str, default: Callable[..., Any]) -> Any:
    """Define ``ds_ops::<name><schema>`` with ``default`` as its pure-PyTorch kernel on every device,
    for ops whose real kernels register from C++ (``TORCH_LIBRARY_IMPL(ds_ops, CPU, m)`` in a JIT
    extension). The dispatcher then calls the C++ kernel directly: a :func:`custom_op` routes every
    call through Python (its device dispatch, alias checks and autograd layers, 10-40 us), which
    matters for an op called dozens of times per decode step. Record the C++ kernel with
    :func:`record_kernel`; register a fake with ``torch.library.register_fake``. Returns the op.
    """
    import torch

    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    lib.define(f"{name}{schema}")
    lib.impl(name, default, "CompositeExplicitAutograd")
    with _lock:
        _libraries.append(lib)
        _ops.setdefault(_short(name), OpInfo(_short(name), default.__module__))
    return getattr(torch.ops.ds_ops, name)


def record_kernel(op_name: str, device_type: str, *, kernel: str, status: StatusFn | str) -> None:
    """List a kernel registered outside Python (see :func:`define_op`) in ``ds report``."""
    probe: StatusFn = status if callable(status) else (lambda s=status: s)
    with _lock:
        info = _ops.setdefault(_short(op_name), OpInfo(_short(op_name), "?"))
        info.kernels[device_type] = (kernel, probe)


def register_kernel(op_name: str, device_type: str, fn: Callable[..., Any], *, kernel: str | None = None,
                    status: StatusFn | str | None = None) -> None:
    """Register ``fn`` as ``ds_ops::<op_name>``'s kernel for ``device_type`` (``"cpu"``, ``"cuda"``,
    ``"xpu"``, a PrivateUse1 name, ...).

    ``fn`` takes the op's arguments. ``kernel`` names it in ``ds report``; ``status`` is a string or a
    callable returning one (it must not compile anything). Later registrations for the same device
    replace earlier ones, so an accelerator package can override ours.
    """
    import torch

    short = _short(op_name)
    if short not in _ops:
        _define_ops()  # a vendor's entry point may run before ours: define our ops first
    if short not in _ops and not _torch_has_op(short):
        known = ", ".join(sorted(_ops)) or "none"
        raise OpInputError(f"no op ds_ops::{short} to register a {device_type} kernel for; "
                           f"known ops: {known}")
    torch.library.register_kernel(_qualified(op_name), device_type, fn)
    label = kernel or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    probe: StatusFn = status if callable(status) else (lambda s=status or "registered": s)
    with _lock:
        info = _ops.setdefault(short, OpInfo(short, getattr(fn, "__module__", "?")))
        info.kernels[device_type] = (label, probe)


def register_optimizer(name: str, cls: type) -> None:
    """Offer ``cls`` as the kernel optimizer for the config's optimizer ``name`` (lower case: ``"adamw"``)."""
    with _lock:
        _optimizers[name.lower()] = cls


def _torch_has_op(short: str) -> bool:
    import torch

    return hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), short)


_defining = threading.local()


def _define_ops() -> None:
    """Import every module in OP_MODULES once (re-entrant: the modules call register_kernel)."""
    if getattr(_defining, "active", False):
        return
    _defining.active = True
    try:
        for module in list(OP_MODULES):
            if module in _module_errors:
                continue
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:  # an optional dependency: expected, report quietly
                _module_errors[module] = f"not available: {exc}"
            except Exception as exc:  # a broken module must not take the other ops down
                _module_errors[module] = f"failed to import: {type(exc).__name__}: {exc}"
                warnings.warn(f"ds_ops: op module {module} {_module_errors[module]}; its ops use the "
                              "PyTorch defaults or are missing", RuntimeWarning, stacklevel=2)
    finally:
        _defining.active = False


def catalogue() -> dict[str, OpInfo]:
    """Ops defined so far by name (call :func:`register` first to define them all)."""
    with _lock:
        return dict(_ops)


def _unlisted_ops() -> list[str]:
    """Ops someone defined in the namespace directly with torch.library, without our helper."""
    import torch

    names = set()
    for qual in torch._C._dispatch_get_all_op_names():
        if qual.startswith(f"{NAMESPACE}::"):
            names.add(qual.split("::", 1)[1].split(".", 1)[0])
    return sorted(names - set(_ops))


class OpsProvider:
    """What ``ds_core.ops`` keeps for this package; ``ds report`` reads :meth:`report_rows`."""

    name = NAMESPACE

    def ops(self) -> list[str]:
        return sorted(set(_ops) | set(_unlisted_ops()))

    @property
    def optimizer_classes(self) -> dict[str, type]:
        """CPU optimizers the engine's factory uses for fp32 CPU parameters (the kernel seam); op modules
        add theirs with :func:`register_optimizer` when they are imported."""
        _define_ops()
        with _lock:
            return dict(_optimizers)

    def report_rows(self) -> list[tuple[str, str, str, str]]:
        """``(op, device, kernel, status)`` for every op and kernel; compiles nothing."""
        rows: list[tuple[str, str, str, str]] = []
        for name, info in sorted(catalogue().items()):
            rows.append((name, "any", "pytorch default", "ready"))
            for device, (label, probe) in sorted(info.kernels.items()):
                try:
                    status = probe()
                except Exception as exc:  # a status probe must never break the report
                    status = f"unknown ({type(exc).__name__}: {exc})"
                rows.append((name, device, label, status))
        for name in _unlisted_ops():
            rows.append((name, "any", "torch.library", "registered outside the ds_ops catalogue"))
        for module, reason in sorted(_module_errors.items()):
            rows.append((module, "-", "op module", reason))
        return rows


def register() -> OpsProvider:
    """The ``ds.ops`` entry point: define every op (cheap, no compilation) and return the provider."""
    global _provider
    with _lock:
        _define_ops()
        if _provider is None:
            _provider = OpsProvider()
        return _provider
