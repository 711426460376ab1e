"""DeepSpeed-style compression training on the yardstick GPT: pruning with a short fine-tune,
redundancy_clean that really removes rows and heads, layer reduction with and without distillation,
and channel pruning of a small convolutional net."""

import copy

import pytest
import torch
from torch import nn

import ds_compress
from ds_compress import compression_scheduler, init_compression, redundancy_clean

from . import _gpt

BLOCK_LINEARS = r"blocks\.\d+\.(attn\.[qkvo]|fc|proj)$"


@pytest.fixture(scope="module")
def yardstick():
    model = _gpt.trained_gpt()
    return model, _gpt.perplexity(model)


def _fine_tune(model, steps, lr=1e-3, first_seed=5000):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = compression_scheduler(model)
    model.train()
    for i in range(steps):
        x, y = _gpt.batch(32, first_seed + i)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
    return model.eval()


def test_half_sparse_l1_pruning_with_a_short_fine_tune(yardstick):
    """50 % of every block weight pruned by magnitude, 60 fine-tuning steps: within 2 % of fp32
    (measured: +2.6 % before the fine-tune, -1.7 % after, the yardstick being lightly trained)."""
    model, fp32 = yardstick
    config = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0, "method": "l1"},
        "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": [BLOCK_LINEARS]}}}}}
    student = _fine_tune(init_compression(copy.deepcopy(model), config), 60)
    x = _gpt.EVAL[0][0]
    with torch.no_grad():
        masked = student(x)
    redundancy_clean(student, config)
    fc = student.blocks[0].fc
    assert type(fc) is nn.Linear and float((fc.weight == 0).float().mean()) == 0.5
    with torch.no_grad():
        assert torch.equal(student(x), masked)
    assert _gpt.perplexity(student) <= fp32 * 1.02


ROW_HEAD = {"compression_training": {
    "row_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk"},
                    "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["fc"],
                                                 "related_modules": [["proj"]]}}},
    "head_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 2, "method": "topk", "num_heads": 4},
                     "different_groups": {"hp1": {"params": {"dense_ratio": 0.5}, "modules": [r"attn\.o"],
                                                  "related_modules": [[r"attn\.q", r"attn\.k", r"attn\.v"]]}}}}}


def test_redundancy_clean_removes_rows_and_heads_with_identical_outputs(yardstick):
    model, _ = yardstick
    student = init_compression(copy.deepcopy(model), ROW_HEAD)
    assert not student.blocks[0].fc.row_on  # schedule_offset 2: not yet
    _fine_tune(student, 4)
    assert student.blocks[0].fc.row_on and student.blocks[0].attn.o.head_on
    x = _gpt.EVAL[0][0]
    with torch.no_grad():
        masked = student(x)
    redundancy_clean(student, ROW_HEAD)
    with torch.no_grad():
        cleaned = student(x)
    assert torch.allclose(cleaned, masked, atol=1e-5, rtol=0)
    block = student.blocks[0]
    assert block.fc.weight.shape == (128, 64) and block.fc.bias.shape == (128,)
    assert block.proj.weight.shape == (64, 128)
    assert block.attn.q.weight.shape == block.attn.k.weight.shape == block.attn.v.weight.shape == (32, 64)
    assert block.attn.o.weight.shape == (64, 32) and block.attn.n_head == 2
    original = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in student.parameters()) < 0.7 * original
    assert all(type(m) is nn.Linear for m in student.modules() if isinstance(m, nn.Linear))


def test_layer_reduction_six_to_three_with_distillation_beats_without():
    """A 3-layer student made of teacher layers 1, 3, 5 fine-tuned on a small task set (4 batches)
    for 60 steps: with logit distillation from the 6-layer teacher it reaches a lower held-out
    perplexity than the same student trained on the labels (measured: 21.0 vs 33.2, teacher 20.2)."""
    teacher = _gpt.trained_gpt(layers=6, steps=300, bsz=16)
    config = {"compression_training": {"layer_reduction": {
        "enabled": True, "keep_number_layer": 3, "module_name_prefix": "blocks", "teacher_layer": [1, 3, 5],
        "other_module_name": ["tok", "pos", "ln_f", "head"]}}}
    data = [_gpt.batch(16, 8000 + i) for i in range(4)]

    def run(loss_fn):
        torch.manual_seed(1)
        student = init_compression(copy.deepcopy(teacher), config, teacher_model=teacher)
        assert len(student.blocks) == 3
        assert torch.equal(student.blocks[1].fc.weight, teacher.blocks[3].fc.weight)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
        student.train()
        for i in range(60):
            x, y = data[i % len(data)]
            loss = loss_fn(student, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return _gpt.perplexity(student)

    def distill(student, x, y):
        with torch.no_grad():
            target = teacher(x)
        return ds_compress.logits_kd_loss(student(x), target)

    labels = run(lambda student, x, y: student(x, y))
    kd = run(distill)
    assert kd < labels, (kd, labels)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def test_channel_pruning_removes_conv_channels():
    torch.manual_seed(0)
    net = _ConvNet()
    net.bn1.running_mean.normal_()
    config = {"compression_training": {"channel_pruning": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0, "method": "l1"},
        "different_groups": {"cp1": {"params": {"dense_ratio": 0.5}, "modules": ["conv1"],
                                     "related_modules": [["conv2", "bn1"]]}}}}}
    init_compression(net, config)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        masked = net(x)
    redundancy_clean(net, config)
    assert net.conv1.weight.shape == (4, 3, 3, 3) and net.conv1.bias.shape == (4,)
    assert net.bn1.num_features == 4 and net.bn1.running_mean.shape == (4,)
    assert net.conv2.weight.shape == (4, 4, 3, 3)
    with torch.no_grad():
        assert torch.allclose(net(x), masked, atol=1e-5)


def test_weight_quantization_schedule_follows_the_step():
    torch.manual_seed(0)
    model = _gpt.GPT(_gpt.Cfg())
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 5, "quantize_groups": 64,
                              "fp16_mixed_quantize": {"enabled": True, "quantize_change_ratio": 0.25}},
        "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 4, "quantization_period": 10},
                                     "modules": ["fc"]}}}}}
    init_compression(model, config)
    fc, scheduler = model.blocks[0].fc, compression_scheduler(model)
    seen = []
    for step in (0, 4, 5, 14, 15, 25, 45, 85, 200):
        scheduler.set_step(step)
        seen.append((fc.wq_bits, fc.wq_mix))
    assert seen == [(None, 1.0), (None, 1.0), (8, 0.25), (8, 1.0), (7, 0.25), (6, 0.25), (5, 0.25),
                    (4, 0.25), (4, 1.0)]


@pytest.mark.parametrize("pattern", ["2:4", "4x1"])
def test_snip_momentum_prunes_gradually_in_blocks(pattern):
    torch.manual_seed(0)
    model = _gpt.GPT(_gpt.Cfg(layers=1, dim=32, heads=2, mlp=64))
    config = {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "schedule_offset": 1, "schedule_offset_end": 5, "schedule_offset_stride": 2,
        "method": "snip_momentum", "block_pattern": pattern, "dense_ratio": 0.5, "excluded_modules": ["head"]},
        "different_groups": {}}}}
    init_compression(model, config)
    assert type(model.head) is nn.Linear  # excluded
    fc = model.blocks[0].fc
    densities = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = compression_scheduler(model)
    for step in range(7):
        x, y = _gpt.batch(4, step)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        densities.append(float(fc.sparse_mask.mean()))
    # cubic ramp from step 1 to step 5, updated every 2 steps: 1 -> ... -> 0.5, never denser again
    assert densities[2] < 1.0 and densities[-1] == 0.5
    assert all(a >= b for a, b in zip(densities, densities[1:]))
    mask = fc.sparse_mask
    if pattern == "2:4":
        assert bool((mask.reshape(64, 8, 4).sum(-1) == 2).all())
    else:
        assert bool((mask.reshape(16, 4, 32).std(1) == 0).all())  # whole 4x1 blocks kept or dropped
