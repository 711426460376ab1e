"""A pretend vendor accelerator: CPU tensors, its own collective backend name ("testgloo").

It is active only when DS_TEST_ACCEL_ACTIVE names it, so installing it does not change what the
rest of the test suite runs on. "testgloo" is gloo registered under another name, which lets a test
see that init_distributed took the backend from the accelerator.

It implements ds_core's ``Accelerator`` protocol from scratch — no ds base class — as a vendor plugin
would, and counts the device calls ds makes, so a test can see the engine goes through it.
"""

import os
import resource
from collections import Counter

import torch
import torch.distributed as dist

BACKEND = "testgloo"


def _register_backend() -> None:
    if BACKEND not in dist.Backend.backend_list:
        def create(store, rank, size, timeout):
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
            return dist.ProcessGroupGloo(store, rank, size, opts)

        dist.Backend.register_backend(BACKEND, create, devices=["cpu"])


class TestAccelerator:
    name = "testaccel"
    device_type = "cpu"
    priority = 10
    visible_devices_env = "TEST_VISIBLE_DEVICES"
    capabilities = frozenset({"fp32", "bf16"})

    def __init__(self) -> None:
        self.calls = Counter()

    def is_available(self) -> bool:
        return self.name in os.environ.get("DS_TEST_ACCEL_ACTIVE", "").split(",")

    def communication_backend(self) -> str:
        _register_backend()
        return BACKEND

    def device(self, index=None):
        self.calls["device"] += 1
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        self.calls["set_device"] += 1

    def synchronize(self) -> None:
        self.calls["synchronize"] += 1

    def supports(self, capability: str) -> bool:
        self.calls["supports"] += 1
        return capability in self.capabilities

    def memory_allocated(self) -> int:
        return 0

    def max_memory_allocated(self) -> int:
        self.calls["max_memory_allocated"] += 1
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak_memory_stats(self) -> None:
        self.calls["reset_peak_memory_stats"] += 1


class SecondAccelerator(TestAccelerator):
    name = "testaccel2"


def hello_main(argv):
    print("hello from a ds.cli plugin", *argv)
    return 0
