"""The accelerator contract.

An accelerator carries only what PyTorch does not already know: its name and torch device type, a
cheap availability probe, the collective backend, capability flags, the environment variable that
limits visible devices (for the launcher) and a priority for auto-detection — plus the few device
calls ds makes (which device, how many, select one, synchronize, memory counters). The
:class:`Accelerator` protocol lists every member ds calls, nothing more: a plugin implementing it
works everywhere in ds. :class:`TorchAccelerator` implements the device calls by forwarding to
``torch.get_device_module(device_type)``, so a plugin for a device PyTorch knows can subclass it and
set only the data.
"""

from __future__ import annotations

import resource
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Accelerator", "TorchAccelerator", "CAPABILITIES"]

# Capability flags an accelerator may declare.
CAPABILITIES = frozenset(
    {"fp32", "bf16", "fp16", "fp8", "pinned_memory", "async_io", "graphs", "triton", "cpu_offload"}
)


@runtime_checkable
class Accelerator(Protocol):
    """Everything ds asks of a device family (the selection checks a plugin against it, naming what
    is missing)."""

    name: str
    device_type: str
    priority: int
    visible_devices_env: str | None  #: the launcher restricts each rank's devices with it (None: not needed)
    capabilities: frozenset[str]  #: subset of :data:`CAPABILITIES`

    def is_available(self) -> bool:
        """Cheap probe: true when this device family can be used in this process."""
        ...

    def communication_backend(self) -> str:
        """The torch.distributed backend for this device family."""
        ...

    def device(self, index: int | None = None) -> torch.device:
        """The ``torch.device`` of device ``index`` (the engine passes the local rank; ``None``: the type)."""
        ...

    def device_count(self) -> int:
        """Devices visible to this process (the launcher starts one rank per device)."""
        ...

    def set_device(self, index: int) -> None:
        """Make device ``index`` current for this process (called before the process group exists)."""
        ...

    def synchronize(self) -> None:
        """Wait for queued work on the current device (timers and the comms logger measure honest times)."""
        ...

    def supports(self, capability: str) -> bool:
        """Whether ``capability`` (e.g. ``"pinned_memory"``, ``"bf16"``) is available."""
        ...

    def memory_allocated(self) -> int:
        """Bytes held by tensors on the current device now."""
        ...

    def max_memory_allocated(self) -> int:
        """Peak bytes held since the start (or :meth:`reset_peak_memory_stats`)."""
        ...

    def reset_peak_memory_stats(self) -> None:
        """Restart the peak counted by :meth:`max_memory_allocated` (a no-op where it cannot be reset)."""
        ...


class TorchAccelerator:
    """Accelerator base that forwards device calls to PyTorch's own device module."""

    name = "base"
    device_type = "cpu"
    priority = 0
    visible_devices_env: str | None = None
    capabilities: frozenset[str] = frozenset({"fp32"})

    def is_available(self) -> bool:
        return bool(self.module.is_available())

    def communication_backend(self) -> str:
        import torch.distributed as dist

        return dist.get_default_backend_for_device(self.device_type)

    # -- forwarded to torch ------------------------------------------------------------------
    @property
    def module(self) -> Any:
        """``torch.cuda``, ``torch.cpu``, ``torch.xpu``... for this device type."""
        return torch.get_device_module(self.device_type)

    def device(self, index: int | None = None) -> torch.device:
        if index is None:
            return torch.device(self.device_type)
        return torch.device(self.device_type, index)

    def device_count(self) -> int:
        return int(self.module.device_count())

    def set_device(self, index: int) -> None:
        self.module.set_device(index)

    def current_device_name(self) -> str:
        """``"cuda:0"``-style name of this process's current device (``"cpu"`` for host devices)."""
        index = getattr(self.module, "current_device", None)
        if self.device_type == "cpu" or index is None:
            return self.device_type
        return f"{self.device_type}:{index()}"

    def synchronize(self) -> None:
        self.module.synchronize()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def memory_allocated(self) -> int:
        """Bytes currently held by tensors on this device (process RSS for host devices)."""
        fn = getattr(self.module, "memory_allocated", None)
        return int(fn()) if fn is not None else _rss_bytes()

    def max_memory_allocated(self) -> int:
        """Peak bytes held on this device (peak process RSS for host devices)."""
        fn = getattr(self.module, "max_memory_allocated", None)
        return int(fn()) if fn is not None else _peak_rss_bytes()

    def reset_peak_memory_stats(self) -> None:
        """Restart the peak (device runs; a process's peak RSS cannot be reset)."""
        fn = getattr(self.module, "reset_peak_memory_stats", None)
        if fn is not None:
            fn()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_type={self.device_type!r}>"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return _peak_rss_bytes()
