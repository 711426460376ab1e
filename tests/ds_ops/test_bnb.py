"""bitsandbytes 8-bit optimizers through ds_ops.bnb: name mapping and errors always; training
against torch.optim.AdamW when bitsandbytes is installed (its 8-bit optimizers run on CPU in
recent releases, checked with 0.50, so this runs without a GPU).

Stated tolerance for AdamW8bit vs AdamW (30 steps, lr 1e-3, a 64x128 linear regression): the
8-bit run reaches a loss within 5% of AdamW's, and its total weight change differs from AdamW's by
under 10% in norm (measured: ~4%, cosine similarity 0.999).
"""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from ds_core.errors import ConfigError
from ds_ops import bnb

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install ds-ops[bnb])")


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("AdamW8bit", "AdamW8bit"),
        ("adamw_8bit", "AdamW8bit"),
        ("Adam8bit", "Adam8bit"),
        ("paged-adamw-8bit", "PagedAdamW8bit"),
        ("Lion8bit", "Lion8bit"),
        ("bnb.PagedLion8bit", "PagedLion8bit"),
        ("AdamW", None),
    ],
)
def test_names_resolve_to_bitsandbytes_classes(name, canonical):
    assert bnb.resolve_name(name) == canonical
    assert bnb.is_bnb_optimizer(name) == (canonical is not None)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"'AdamW8bti' is not a bitsandbytes optimizer \(did you mean 'AdamW8bit'"):
        bnb.build_optimizer("AdamW8bti", [torch.nn.Parameter(torch.zeros(2))])


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    assert not bnb.available()
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install ds-ops\[bnb\]"):
        bnb.build_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_auto_params_must_be_resolved_first():
    with pytest.raises(ConfigError, match="params lr are still 'auto'"):
        bnb.from_config({"type": "AdamW8bit", "params": {"lr": "auto"}}, [])


def _regression(make_optimizer, steps=30):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)  # 8192 weights: above bitsandbytes' 4096-element 8-bit threshold
    start = model.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=g)
    y = x @ (0.1 * torch.randn(64, 128, generator=g)).t()
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, model, model.weight.detach() - start, losses


@needs_bnb
def test_adamw8bit_follows_torch_adamw():
    opt, model, delta, losses = _regression(
        lambda p: bnb.from_config({"type": "AdamW8bit", "params": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                                   "weight_decay": 0.01}}, p)  # fmt: skip
    )
    _, _, ref_delta, ref_losses = _regression(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
    assert opt.state[model.weight]["state1"].dtype == torch.uint8  # the state really is 8-bit
    assert losses[-1] < 0.7 * losses[0]
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.05)
    assert (delta - ref_delta).norm() < 0.1 * ref_delta.norm()


@needs_bnb
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name,lr", [("Lion8bit", 1e-4), ("PagedAdamW8bit", 1e-3), ("Adam8bit", 1e-3)])
def test_other_8bit_optimizers_reduce_the_loss(name, lr):
    _, _, _, losses = _regression(lambda p: bnb.build_optimizer(name, p, lr=lr), steps=10)
    assert losses[-1] < losses[0]


@needs_bnb
def test_unknown_argument_names_what_is_accepted():
    with pytest.raises(ConfigError, match=r"AdamW8bit does not take 'adam_w_mode'.*accepts .*weight_decay"):
        bnb.build_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(2))], adam_w_mode=True)
