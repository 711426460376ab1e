"""Bad input fails with an error naming the value, the rule and the fix."""

import pytest
import torch

from ds_compress import CompressionError, init_compression, quantize, redundancy_clean

from . import _gpt


def _model():
    torch.manual_seed(0)
    return _gpt.GPT(_gpt.Cfg(layers=2, dim=32, heads=4, mlp=48))


def _section(**methods):
    return {"compression_training": methods}


def test_module_pattern_matching_nothing():
    config = _section(weight_quantization={"shared_parameters": {"enabled": True},
                                           "different_groups": {"wq1": {"modules": [r"encoder\.layer"]}}})
    with pytest.raises(CompressionError, match=r"wq1: module pattern 'encoder\\\\.layer' matches no"):
        init_compression(_model(), config)
    with pytest.raises(CompressionError, match="'nope' matches no Linear"):
        quantize(_model(), "rtn", modules=["nope"])


@pytest.mark.parametrize("bits", [3, 16, 0, True])
def test_bits_outside_the_supported_set(bits):
    with pytest.raises(CompressionError, match=f"bits={bits!r} is not supported; bits must be one of 8, 4, 2, 1"):
        quantize(_model(), "rtn", bits=bits)
    with pytest.raises(CompressionError, match="bits=8 is not supported; bits must be one of 2, 1"):
        quantize(_model(), "xtc", bits=8, calibration=[torch.zeros(1, 4, dtype=torch.long)])


def test_activation_bits_and_start_below_target():
    bad_act = _section(activation_quantization={"shared_parameters": {"enabled": True},
                                                "different_groups": {"aq1": {"params": {"bits": 6}}}})
    with pytest.raises(CompressionError, match="activation bits 6 must be 4 or 8"):
        init_compression(_model(), bad_act)
    bad_order = _section(weight_quantization={"shared_parameters": {"enabled": True}, "different_groups": {
        "wq1": {"params": {"start_bits": 4, "target_bits": 8}}}})
    with pytest.raises(CompressionError, match="target_bits 8 > start_bits 4"):
        init_compression(_model(), bad_order)


def test_group_size_not_dividing_the_input_dimension():
    with pytest.raises(CompressionError, match=r"group_size=20 does not divide the input dimension 32; choose a "
                                               r"divisor of 32 \(e.g. 32\)"):
        quantize(_model(), "rtn", bits=4, group_size=20)
    with pytest.raises(CompressionError, match="quantize_groups=5 does not fit layer"):
        init_compression(_model(), _section(weight_quantization={
            "shared_parameters": {"enabled": True, "quantize_groups": 5},
            "different_groups": {"wq1": {"modules": ["fc"]}}}))


def test_more_heads_than_the_model_has():
    def config(heads):
        return _section(head_pruning={
            "shared_parameters": {"enabled": True, "num_heads": heads},
            "different_groups": {"hp1": {"modules": [r"attn\.o"], "related_modules": [[r"attn\.q"]]}}})

    with pytest.raises(CompressionError, match="num_heads=8 but blocks.0.attn.n_head is 4"):
        init_compression(_model(), config(8))
    with pytest.raises(CompressionError, match="num_heads=64 but"):
        init_compression(_model(), config(64))
    with pytest.raises(CompressionError, match="head_pruning needs shared_parameters.num_heads"):
        init_compression(_model(), _section(head_pruning={"shared_parameters": {"enabled": True},
                                                          "different_groups": {"hp1": {}}}))


def test_teacher_layer_out_of_range():
    config = _section(layer_reduction={"enabled": True, "keep_number_layer": 2, "module_name_prefix": "blocks",
                                       "teacher_layer": [0, 5]})
    with pytest.raises(CompressionError, match=r"teacher_layer 5 is out of range: the teacher has 2 layers under "
                                               r"'blocks' \(0..1\)"):
        init_compression(_model(), config, teacher_model=_model())
    config["compression_training"]["layer_reduction"]["teacher_layer"] = [0]
    with pytest.raises(CompressionError, match="teacher_layer has 1 entries but keep_number_layer is 2"):
        init_compression(_model(), config)


def test_unknown_keys_and_values_name_the_fix():
    with pytest.raises(CompressionError, match="unknown config key.*sparse_prunning'.*did you mean 'sparse_pruning'"):
        init_compression(_model(), {"compression_training": {"sparse_prunning": {}}})
    with pytest.raises(CompressionError, match="rounding = 'up' is invalid"):
        init_compression(_model(), _section(weight_quantization={"shared_parameters": {"rounding": "up"}}))
    with pytest.raises(CompressionError, match="no 'compression_training' section"):
        redundancy_clean(_model(), {"train_batch_size": 8})


def test_calibration_is_required_where_the_method_needs_data():
    with pytest.raises(CompressionError, match="method='gptq'.*needs calibration batches"):
        quantize(_model(), "gptq", bits=4)
    with pytest.raises(CompressionError, match="method='awq' is not one of rtn, gptq, zeroquant, xtc"):
        quantize(_model(), "awq")


def test_a_module_in_two_groups_of_one_method():
    config = _section(sparse_pruning={"shared_parameters": {"enabled": True}, "different_groups": {
        "a": {"modules": ["fc"]}, "b": {"modules": [r"blocks\.0\."]}}})
    with pytest.raises(CompressionError, match="module 'blocks.0.fc' is already in group 'a'"):
        init_compression(_model(), config)
