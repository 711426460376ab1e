"""Built-in accelerators: CPU, CUDA (and ROCm through torch.cuda), and any PrivateUse1 device."""

from __future__ import annotations

import torch

from .base import TorchAccelerator

__all__ = ["CpuAccelerator", "CudaAccelerator", "PrivateUse1Accelerator"]


class CpuAccelerator(TorchAccelerator):
    name = "cpu"
    device_type = "cpu"
    priority = 0
    visible_devices_env = None
    capabilities = frozenset({"fp32", "bf16", "async_io"})

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        pass  # one host device; ranks share it


class CudaAccelerator(TorchAccelerator):
    name = "cuda"
    device_type = "cuda"
    priority = 100
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    capabilities = frozenset(
        {"fp32", "bf16", "fp16", "pinned_memory", "async_io", "graphs", "triton", "cpu_offload"}
    )

    def is_available(self) -> bool:
        # device_count() asks NVML/the driver without creating a context.
        return torch.cuda.device_count() > 0


class PrivateUse1Accelerator(TorchAccelerator):
    """Any device a PyTorch out-of-tree backend registered as PrivateUse1 (no ds plugin needed)."""

    priority = 50
    capabilities = frozenset({"fp32", "bf16", "fp16"})

    def __init__(self) -> None:
        backend = torch._C._get_privateuse1_backend_name()
        self.name = backend
        self.device_type = backend
        self.visible_devices_env = f"{backend.upper()}_VISIBLE_DEVICES"

    def is_available(self) -> bool:
        if self.device_type == "privateuse1":
            return False  # nothing renamed the slot: no backend is loaded
        module = getattr(torch, self.device_type, None)
        probe = getattr(module, "is_available", None)
        return bool(probe()) if probe is not None else False
