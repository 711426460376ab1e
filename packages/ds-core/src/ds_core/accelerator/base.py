"""The accelerator contract.

An accelerator carries only what PyTorch does not already know: its name and torch device type, a
cheap availability probe, the collective backend, capability flags, the environment variable that
limits visible devices (for the launcher) and a priority for auto-detection. Device, stream, memory
and RNG calls go to ``torch.get_device_module(device_type)``; :class:`TorchAccelerator` forwards them
so callers have one object to ask.
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
    """What ds needs to know about a device family beyond what torch already provides."""

    name: str
    device_type: str
    priority: int
    visible_devices_env: str | None
    capabilities: frozenset[str]

    def is_available(self) -> bool:
        """Cheap probe: true when this device family can be used in this process."""
        ...

    def communication_backend(self) -> str:
        """The torch.distributed backend for this device family."""
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
