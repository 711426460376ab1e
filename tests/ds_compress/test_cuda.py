"""The same quantizer, GPTQ and export on a CUDA device: codes equal to the CPU's (GPTQ within a few
codes: its Cholesky and matmuls round differently), the export decoded by the reference reader."""

import copy

import pytest
import torch

from ds_compress import init_compression, quantize, save_quantized

from . import _gpt, _reference


def _model():
    torch.manual_seed(0)
    return _gpt.GPT(_gpt.Cfg(layers=2)).eval()


@pytest.mark.cuda
def test_rtn_and_gptq_on_cuda_match_the_cpu(tmp_path):
    x = _gpt.batch(2, 1)[0]
    for method, kwargs in [("rtn", {"bits": 4, "group_size": 32}),
                           ("gptq", {"bits": 4, "group_size": 32, "calibration": _gpt.CALIB[:2]})]:
        cpu = quantize(_model(), method, **kwargs)
        cuda_kwargs = dict(kwargs)
        if "calibration" in kwargs:
            cuda_kwargs["calibration"] = [b.cuda() for b in kwargs["calibration"]]
        gpu = quantize(_model().cuda(), method, **cuda_kwargs)
        a, b = cpu.blocks[0].fc.codes, gpu.blocks[0].fc.codes.cpu()
        if method == "rtn":
            assert torch.equal(a, b)
        else:
            assert float((a != b).float().mean()) < 0.05
        save_quantized(gpu, tmp_path / method)
        ref = _reference.load_into(copy.deepcopy(_model()), tmp_path / method)
        with torch.no_grad():
            assert torch.allclose(ref(x), gpu(x.cuda()).cpu(), atol=1e-3)


@pytest.mark.cuda
def test_compression_training_layers_on_cuda():
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_groups": 64},
        "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 4}, "modules": ["fc"]}}}}}
    model = init_compression(_model().cuda(), config)
    x, y = (t.cuda() for t in _gpt.batch(4, 0))
    loss = model(x, y)
    loss.backward()
    assert model.blocks[0].fc.weight.grad is not None and torch.isfinite(loss)
