"""Long-context tiling (ALST): a tiled MLP and a tiled output head + loss equal the untiled computation
(values and every gradient, fp32, 1e-5: the tiles add the same products in another order), replay dropout consistently, and keep peak memory flat as
the sequence grows 4× (measured with ``ds_parallel.PeakMemory``; the table prints with ``-s``)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_core.errors import ConfigError
from ds_parallel import PeakMemory, tile_mlp, tile_mlps, tiled_causal_lm_loss, tiled_lm_loss

from ._models import hf_model


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mlp(hidden=32, inner=512):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))


def test_tiled_mlp_equals_untiled():
    ref = _mlp()
    tiled = tile_mlp(copy.deepcopy(ref), tiles=5)  # 5 tiles of 40 positions, uneven: 8,8,8,8,8
    x = torch.randn(2, 40, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), tiled(x2)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    _close(y2, y)
    _close(x2.grad, x.grad)
    for a, b in zip(tiled.parameters(), ref.parameters()):
        _close(a.grad, b.grad)
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_tiled_mlp_replays_dropout_in_backward():
    torch.manual_seed(1)
    block = nn.Sequential(nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 16))
    tiled = tile_mlp(copy.deepcopy(block), tiles=3)
    x = torch.randn(2, 12, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y2 = tiled(x2)
    torch.manual_seed(7)  # the same draws, tile by tile, with autograd
    y = torch.cat([block(t) for t in x.tensor_split(3, dim=1)], dim=1)
    y.sum().backward()
    y2.sum().backward()
    _close(y2, y)
    _close(x2.grad, x.grad)  # backward recomputed each tile with its own dropout mask


def test_tiled_loss_equals_cross_entropy():
    torch.manual_seed(2)
    head = nn.Linear(32, 300, bias=False)
    head2 = copy.deepcopy(head)
    h = torch.randn(2, 50, 32, requires_grad=True)
    h2 = h.detach().clone().requires_grad_()
    labels = torch.randint(0, 300, (2, 50))
    labels[1, -7:] = -100
    total, valid = tiled_lm_loss(h, head, labels, tile_size=16)
    (total / valid).backward()
    ref = F.cross_entropy(head2(h2).view(-1, 300), labels.view(-1))
    ref.backward()
    _close(total / valid, ref)
    _close(h.grad, h2.grad)
    _close(head.weight.grad, head2.weight.grad)


def test_tiled_hf_llama_equals_its_own_loss():
    ref = hf_model("llama")
    model = copy.deepcopy(ref)
    assert tile_mlps(model, tiles=4) == [f"model.layers.{i}.mlp" for i in range(2)]
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    shift = F.pad(ids[:, 1:], (0, 1), value=-100)
    tiled = tiled_causal_lm_loss(model, shift, tiles=3, input_ids=ids)
    tiled.backward()
    _close(tiled, loss)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_bad_tiling_arguments():
    with pytest.raises(ConfigError, match="give tiles= or tile_size=, not both"):
        tiled_lm_loss(torch.zeros(1, 4, 2), nn.Linear(2, 3), torch.zeros(1, 4, dtype=torch.long), tiles=2, tile_size=2)
    with pytest.raises(ConfigError, match="must agree on"):
        tiled_lm_loss(torch.zeros(1, 4, 2), nn.Linear(2, 3), torch.zeros(1, 5, dtype=torch.long))


def _peak(fn):
    with PeakMemory() as m:
        fn()
    return m.peak


def _mlp_step(module, length):
    def run():
        x = torch.randn(1, length, 32, requires_grad=True)
        module(x).sum().backward()
    return run


def _loss_step(head, length, tile_size):
    def run():
        h = torch.randn(1, length, 32, requires_grad=True)
        labels = torch.randint(0, 2000, (1, length))
        if tile_size is None:
            F.cross_entropy(head(h).view(-1, 2000), labels.view(-1), reduction="sum").backward()
        else:
            tiled_lm_loss(h, head, labels, tile_size=tile_size)[0].backward()
    return run


def test_tiled_peak_memory_stays_flat_as_the_sequence_grows_4x():
    plain, tiled = _mlp(), tile_mlp(_mlp(), tile_size=256)
    head = nn.Linear(32, 2000, bias=False)
    rows = []
    for length in (1024, 4096):
        rows.append((length, _peak(_mlp_step(plain, length)), _peak(_mlp_step(tiled, length)),
                     _peak(_loss_step(head, length, None)), _peak(_loss_step(head, length, 256))))
    print("\npeak bytes of forward + backward (hidden 32, MLP inner 512, vocabulary 2000, tiles of 256):")
    print(f"{'sequence':>9} {'MLP':>12} {'tiled MLP':>12} {'loss':>12} {'tiled loss':>12}")
    for row in rows:
        print(f"{row[0]:>9} " + " ".join(f"{v:>12,}" for v in row[1:]))
    (_, mlp1, tmlp1, loss1, tloss1), (_, mlp4, tmlp4, loss4, tloss4) = rows
    print(f"{'4x / 1x':>9} {mlp4 / mlp1:>12.2f} {tmlp4 / tmlp1:>12.2f} {loss4 / loss1:>12.2f} {tloss4 / tloss1:>12.2f}")
    assert mlp4 / mlp1 > 3.5 and loss4 / loss1 > 3.5  # untiled: grows with the sequence
    # tiled: only the layer's own input/output-sized tensors grow; the intermediates stay one tile
    assert tmlp4 < 0.35 * mlp4 and tloss4 < 0.1 * loss4
    assert tloss4 / tloss1 < 1.5
