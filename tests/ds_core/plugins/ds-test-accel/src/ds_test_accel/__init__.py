"""A pretend vendor accelerator: CPU tensors, its own collective backend name ("testgloo").

It is active only when DS_TEST_ACCEL_ACTIVE names it, so installing it does not change what the
rest of the test suite runs on. "testgloo" is gloo registered under another name, which lets a test
see that init_distributed took the backend from the accelerator.
"""

import os

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

    def is_available(self) -> bool:
        return self.name in os.environ.get("DS_TEST_ACCEL_ACTIVE", "").split(",")

    def communication_backend(self) -> str:
        _register_backend()
        return BACKEND

    def synchronize(self) -> None:
        pass


class SecondAccelerator(TestAccelerator):
    name = "testaccel2"


def hello_main(argv):
    print("hello from a ds.cli plugin", *argv)
    return 0
