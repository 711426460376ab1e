"""A DeepSpeed ZeroQuant-style ``compression_training`` config on a tiny Hugging Face BERT built from
a config: two weight-quantization groups (one by regex), activation quantization, the four pruning
blocks (channel pruning present but off: BERT has no convolution) and layer reduction 4 -> 2. It
goes through init_compression, trains with the ds-core engine, redundancy_clean shrinks the model to
what the masks kept with the same outputs, and the result exports to the ds-quant format."""

import copy

import pytest
import torch

pytest.importorskip("transformers")  # the [test] extra of ds-compress
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import ds_core  # noqa: E402
from ds_compress import init_compression, redundancy_clean, save_quantized  # noqa: E402

from . import _reference  # noqa: E402

COMPRESSION = {
    "weight_quantization": {
        "shared_parameters": {"enabled": True, "quantizer_kernel": False, "schedule_offset": 0, "quantize_groups": 16,
                              "quantize_verbose": False, "quantization_type": "symmetric", "rounding": "nearest",
                              "quantize_weight_in_forward": True,
                              "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001}},
        "different_groups": {
            "wq1": {"params": {"start_bits": 8, "target_bits": 8, "quantization_period": 50},
                    "modules": ["attention.self", "intermediate"]},
            "wq2": {"params": {"start_bits": 6, "target_bits": 4, "quantization_period": 1},
                    "modules": [r"layer\.\d+\.output\.dense", r"attention\.output\.dense"]}}},
    "activation_quantization": {
        "shared_parameters": {"enabled": True, "quantization_type": "symmetric", "range_calibration": "dynamic",
                              "schedule_offset": 0},
        "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["attention.self", "intermediate", "output.dense"]}}},
    "sparse_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "l1"},
        "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"]}}},
    "row_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk"},
        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                     "related_modules": [["layer.\\w+.output.dense"]]}}},
    "head_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk", "num_heads": 4},
        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.output.dense"],
                                     "related_modules": [["self.query", "self.key", "self.value"]]}}},
    "channel_pruning": {
        "shared_parameters": {"enabled": False, "schedule_offset": 0, "method": "topk"},
        "different_groups": {"cp1": {"params": {"dense_ratio": 0.5}, "modules": ["layer....conv1"],
                                     "related_modules": [["layer....conv2", "layer....bn1"]]}}},
    "layer_reduction": {"enabled": True, "keep_number_layer": 2, "module_name_prefix": "bert.encoder.layer",
                        "teacher_layer": [1, 3], "other_module_name": ["bert.pooler", "bert.embeddings", "classifier"]},
}
CONFIG = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 0, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "compression_training": COMPRESSION}


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 100, (8, 16), generator=g)
    return {"input_ids": ids, "labels": (ids[:, 0] % 2)}


def test_zeroquant_style_config_on_a_tiny_bert(tmp_path):
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)
    teacher = BertForSequenceClassification(bert).eval()
    student = init_compression(copy.deepcopy(teacher), CONFIG, teacher_model=teacher)
    layers = student.bert.encoder.layer
    assert len(layers) == 2 and student.config.num_hidden_layers == 2
    assert torch.equal(layers[1].attention.self.query.weight, teacher.bert.encoder.layer[3].attention.self.query.weight)

    engine, *_ = ds_core.initialize(model=student, config=CONFIG)
    losses = []
    for step in range(6):
        out = engine(**_batch(step))
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    layer = engine.module.bert.encoder.layer[0]
    assert layer.attention.output.dense.wq_bits == 4 and layer.attention.self.query.wq_bits == 8
    assert layer.intermediate.dense.row_on and layer.attention.output.dense.head_on
    assert layer.attention.self.key.sparse_on and layer.output.dense.aq_on

    model = engine.module.eval()
    ids = _batch(100)["input_ids"]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    before = sum(p.numel() for p in model.parameters())
    redundancy_clean(model, CONFIG)
    after = sum(p.numel() for p in model.parameters())
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    assert layer.attention.self.query.weight.shape == (16, 32)
    assert layer.attention.output.dense.weight.shape == (32, 16) and layer.attention.self.num_attention_heads == 2
    assert after < 0.85 * before
    with torch.no_grad():
        cleaned = model(input_ids=ids).logits
    assert torch.allclose(cleaned, masked, atol=1e-4, rtol=0)

    save_quantized(model, tmp_path)
    desc, _ = _reference.read(tmp_path)
    assert desc["modules"]["bert.encoder.layer.0.attention.output.dense"]["bits"] == 4
    assert desc["modules"]["bert.encoder.layer.0.attention.output.dense"]["in_features"] == 16
    assert desc["activations"]["dynamic"] is True and (tmp_path / "config.json").is_file()
    reference = _reference.load_into(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, cleaned, atol=1e-4, rtol=0)
