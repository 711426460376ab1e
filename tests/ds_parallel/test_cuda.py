"""On a CUDA device: the tiled MLP and tiled loss equal the untiled ones and keep the allocator's peak
flat as the sequence grows 4× (``torch.cuda.max_memory_allocated``); layers run on CUDA tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_parallel import ColumnParallelLinear, RowParallelLinear, tile_mlp, tiled_lm_loss


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.cuda
def test_tiling_on_cuda_equals_untiled_with_flat_peak():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 256)).to(dev)
    tiled = tile_mlp(copy.deepcopy(mlp), tile_size=512)
    head = nn.Linear(256, 16000, bias=False).to(dev)
    x = torch.randn(1, 2048, 256, device=dev, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mlp(x).square().sum().backward()
    tiled(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-4)
    peaks = {}
    for length in (2048, 8192):
        h = torch.randn(1, length, 256, device=dev, requires_grad=True)
        labels = torch.randint(0, 16000, (1, length), device=dev)
        peaks[length] = (_peak(lambda h=h: mlp(h).sum().backward()), _peak(lambda h=h: tiled(h).sum().backward()),
                         _peak(lambda h=h, y=labels: F.cross_entropy(head(h).view(-1, 16000), y.view(-1)).backward()),
                         _peak(lambda h=h, y=labels: tiled_lm_loss(h, head, y, tile_size=512)[0].backward()))
    (mlp1, tmlp1, loss1, tloss1), (mlp4, tmlp4, loss4, tloss4) = peaks[2048], peaks[8192]
    assert mlp4 > 3.5 * mlp1 and loss4 > 3.5 * loss1
    assert tmlp4 < 0.5 * mlp4 and tloss4 < 0.1 * loss4
    assert tmlp4 < 2.5 * tmlp1 and tloss4 < 1.5 * tloss1  # only input/output-sized tensors grow


@pytest.mark.cuda
def test_layers_on_cuda_with_one_rank():
    dev = torch.device("cuda")
    lin = nn.Linear(64, 32).to(dev)
    x = torch.randn(4, 64, device=dev)
    torch.testing.assert_close(ColumnParallelLinear.from_dense(lin)(x), lin(x))
    torch.testing.assert_close(RowParallelLinear.from_dense(lin)(x), lin(x))
