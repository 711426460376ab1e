"""Shared by every test directory.

- Triton kernels run interpreted on CPU tensors unless told otherwise. Set before collection imports
  anything: a framework imported by one test module (Lightning, transformers) may import Triton, and
  Triton reads ``TRITON_INTERPRET`` once, when first imported. The GPU run sets
  ``TRITON_INTERPRET=0`` itself to compile the kernels for the device.
- A test that calls ``ds_core.initialize`` in the pytest process gets a one-process group, as a
  user's script does; it is destroyed after the test, so the next test in the same worker starts
  without one whatever the order the tests are dealt in.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left_behind_by_a_module():
    """The same for a module-scoped fixture that built an engine in the pytest process (set up first,
    torn down last among the module's fixtures)."""
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
