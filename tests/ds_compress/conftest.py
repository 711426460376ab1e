"""The models of these tests are tiny: one intra-op thread runs them fastest, and on a shared
machine extra threads only spin against other jobs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
