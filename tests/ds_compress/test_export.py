"""save_quantized writes docs/quantized-format.md exactly: an independent reader (``_reference``)
decodes every layer to the weights the quantized model computes with, and runs the checkpoint with
the same outputs. Untrained tiny models: exactness, not quality, is tested here."""

import copy
import json

import pytest
import torch
from torch import nn

import ds_compress
from ds_compress import CompressionError, load_quantized, quantize, save_quantized

from . import _gpt, _reference


def _model(seed=0):
    torch.manual_seed(seed)
    m = _gpt.GPT(_gpt.Cfg(dim=64, heads=4, layers=2, mlp=128))
    for p in m.parameters():  # larger weights than the GPT-2 init, so quantization errors show
        p.data.normal_(0, 0.3)
    return m.eval()


CALIB = [_gpt.batch(4, 100 + i)[0] for i in range(2)]
X = _gpt.batch(2, 999)[0]


@pytest.mark.parametrize("method,kwargs", [
    ("rtn", {"bits": 4, "group_size": 32}),
    ("rtn", {"bits": 8, "group_size": -1, "symmetric": False}),
    ("gptq", {"bits": 4, "group_size": 32, "calibration": CALIB}),
    ("gptq", {"bits": 4, "group_size": 64, "symmetric": False, "calibration": CALIB, "act_order": False}),
    ("zeroquant", {"bits": 8, "group_size": 64}),
    ("xtc", {"bits": 2, "group_size": 32, "calibration": CALIB, "distill_steps": 2}),
    ("xtc", {"bits": 1, "group_size": -1, "calibration": CALIB, "distill_steps": 2}),
])
def test_reference_reader_reproduces_the_quantized_model(tmp_path, method, kwargs):
    q = quantize(_model(), method, **kwargs)
    save_quantized(q, tmp_path)
    desc, tensors = _reference.read(tmp_path)
    assert desc["format"] == "ds-quant" and desc["version"] == 1 and desc["method"] == method
    assert desc["dtype"] == "float32" and set(desc["modules"]) == {
        n for n, m in q.named_modules() if isinstance(m, ds_compress.QuantizedLinear)}
    for name, entry in desc["modules"].items():
        layer = q.get_submodule(name)
        assert entry["bits"] == kwargs["bits"] and entry["in_features"] == layer.in_features
        assert torch.equal(_reference.weight(desc, tensors, name).float(), layer.dequantized_weight())
        assert entry["perm"] == (method == "gptq" and kwargs.get("act_order", True))
    assert desc["activations"] == ({"bits": 8, "dynamic": True, "granularity": "token", "symmetric": True}
                                   if method == "zeroquant" else None)
    ref = _reference.load_into(_model(seed=1), tmp_path)  # other weights: everything must come from the files
    with torch.no_grad():
        assert torch.allclose(ref(X), q(X), atol=1e-5, rtol=0)


def test_round_trip_through_load_quantized_and_shards(tmp_path):
    q = quantize(_model(), "gptq", bits=4, group_size=32, calibration=CALIB)
    save_quantized(q, tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_quantized(_model(seed=2), tmp_path)
    with torch.no_grad():
        assert torch.equal(back(X), q(X))


def test_tied_embedding_is_stored_once_and_unquantized(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 32)
            self.mid = nn.Linear(32, 32)
            self.head = nn.Linear(32, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.mid(self.emb(x)))

    torch.manual_seed(0)
    m = quantize(Tied(), "rtn", bits=4, group_size=16)
    assert isinstance(m.head, nn.Linear)  # the tied head is not quantized by default
    save_quantized(m, tmp_path)
    desc, tensors = _reference.read(tmp_path)
    assert list(desc["modules"]) == ["mid"]
    assert "emb.weight" in tensors and "head.weight" not in tensors
    back = load_quantized(Tied(), tmp_path)
    x = torch.arange(8)[None]
    assert torch.equal(back(x), m(x))


def test_qat_model_exports_its_fake_quantized_weights(tmp_path):
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_groups": 128, "quantization_type": "asymmetric"},
        "different_groups": {"wq1": {"params": {"start_bits": 4, "target_bits": 4}, "modules": ["attn"]},
                             "wq2": {"params": {"start_bits": 8, "target_bits": 8}, "modules": ["fc$", "proj"]}}}}}
    model = ds_compress.init_compression(_model(), config)
    with torch.no_grad():
        trained = model(X)
    save_quantized(model, tmp_path)
    desc, _ = _reference.read(tmp_path)
    assert desc["method"] == "qat"
    assert desc["modules"]["blocks.0.attn.q"]["bits"] == 4 and desc["modules"]["blocks.0.fc"]["bits"] == 8
    assert desc["modules"]["blocks.0.attn.q"]["group_size"] == 32  # 128 groups over [64, 64]: two per row
    ref = _reference.load_into(_model(seed=3), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ref(X), trained, atol=1e-5, rtol=0)
    ds_compress.redundancy_clean(model, config)  # baked into the weights: the same checkpoint
    save_quantized(model, tmp_path / "clean")
    ref = _reference.load_into(_model(seed=3), tmp_path / "clean")
    with torch.no_grad():
        assert torch.allclose(ref(X), trained, atol=1e-5, rtol=0)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(CompressionError, match="no quantized layer"):
        save_quantized(_model(), tmp_path)
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_groups": 64},
        "different_groups": {"wq1": {"params": {"start_bits": 3, "target_bits": 3}, "modules": ["blocks"]}}}}}
    model = ds_compress.init_compression(_model(), config)
    with pytest.raises(CompressionError, match="3 bits.*stores 8, 4, 2, 1"):
        save_quantized(model, tmp_path)
    q = copy.deepcopy(_model())
    quantize(q, "zeroquant", bits=8, modules=["attn"])
    quantize(q, "rtn", bits=8, modules=["fc$"])
    with pytest.raises(CompressionError, match="one activation scheme"):
        save_quantized(q, tmp_path)


@pytest.mark.smoke
def test_quantize_save_and_read_back(tmp_path):
    q = quantize(_model(), "rtn", bits=4, group_size=32)
    save_quantized(q, tmp_path)
    ref = _reference.load_into(_model(seed=1), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ref(X), q(X), atol=1e-5, rtol=0)


def test_quantized_linear_reloads_its_state():
    q = quantize(_model(), "rtn", bits=4, group_size=32)
    other = quantize(_model(seed=5), "rtn", bits=4, group_size=32)
    with torch.no_grad():
        other(X)  # decodes (and caches) its own weights
        other.load_state_dict(q.state_dict())
        assert torch.equal(other(X), q(X))


def test_static_activation_ranges_export_as_act_scale(tmp_path):
    config = {"compression_training": {
        "weight_quantization": {"shared_parameters": {"enabled": True, "quantize_groups": 64},
                                "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8},
                                                             "modules": ["blocks"]}}},
        "activation_quantization": {"shared_parameters": {"enabled": True, "schedule_offset": 0,
                                                          "range_calibration": "static"},
                                    "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["blocks"]}}}}}
    model = ds_compress.init_compression(_model(), config)
    model.train()
    with torch.no_grad():
        for i in range(3):  # training forwards calibrate the ranges (momentum 0.95)
            model(_gpt.batch(4, 50 + i)[0])
    model.eval()
    fc = model.blocks[0].fc
    assert float(fc.act_range[0]) < 0 < float(fc.act_range[1])
    save_quantized(model, tmp_path)
    desc, tensors = _reference.read(tmp_path)
    assert desc["activations"] == {"bits": 8, "dynamic": False, "granularity": "tensor", "symmetric": True}
    assert tensors["blocks.0.fc.act_scale"].dtype == torch.float32 and tensors["blocks.0.fc.act_scale"].dim() == 0
    ref = _reference.load_into(_model(seed=4), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ref(X), model(X), atol=1e-4, rtol=0)
