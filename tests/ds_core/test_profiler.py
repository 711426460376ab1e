"""The flops profiler, and what the log line shows around a run: tokens/s with keyword inputs, TFLOPs, ETA.

MACs are checked against the closed form of dense layers (a Linear of ``i -> o`` on ``n`` rows costs
``n·i·o`` multiply-adds), exactly; parameters against ``numel``; the log line by its text.
"""

from __future__ import annotations

import re

import pytest
import torch

import ds_core
from ds_core.errors import ConfigError
from ds_core.profiling import FlopsProfiler, FlopsProfilerConfig, RunReport, format_eta, get_model_profile


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)))


def test_get_model_profile_counts_macs_and_params_exactly(capsys):
    model = _mlp()
    flops, macs, params = get_model_profile(model, args=(torch.randn(5, 8),), module_depth=-1)
    expected_macs = 5 * (8 * 16 + 16 * 32 + 32 * 4)
    assert macs == expected_macs and flops == 2 * expected_macs
    assert params == sum(p.numel() for p in model.parameters())
    table = capsys.readouterr().out
    assert table.count("(Linear)") >= 3 and "(model) (Sequential)" in table
    with FlopsProfiler(model) as prof:
        model(torch.randn(5, 8))
    by_name = {m.name: m for m in prof.profile.modules}
    assert by_name["0"].macs == 5 * 8 * 16 and by_name["2.1"].macs == 5 * 32 * 4
    assert by_name["2"].macs == 5 * (16 * 32 + 32 * 4) and by_name["1"].macs == 0  # ReLU: no multiply-adds
    assert by_name["2"].params == 16 * 32 + 32 + 32 * 4 + 4 and by_name["2"].depth == 1


def test_profile_table_respects_module_depth_and_writes_output_file(tmp_path):
    out = tmp_path / "profile.txt"
    get_model_profile(_mlp(), args=(torch.randn(2, 8),), module_depth=1, output_file=str(out))
    text = out.read_text()
    assert "ds flops profiler" in text and "(ReLU)" in text
    assert "      0 (Linear)" not in text  # depth-2 modules are left out at module_depth 1


def test_unknown_flops_profiler_key_is_refused_naming_it():
    with pytest.raises(ConfigError, match="profile_stepp"):
        FlopsProfilerConfig.from_raw({"enabled": True, "profile_stepp": 2})


def test_format_eta():
    assert format_eta(0) == "0:00:00"
    assert format_eta(3723.4) == "1:02:03"
    assert format_eta(2 * 86400 + 5) == "2d 0:00:05"


class _KeywordModel(torch.nn.Module):
    """Called as Hugging Face models are: ``model(input_ids=..., labels=...)`` returning the loss."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids=None, labels=None):
        logits = self.head(self.emb(input_ids))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _run(config, steps=6):
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=_KeywordModel(), config=config)
    for _ in range(steps):
        ids = torch.randint(0, 32, (4, 10))
        loss = engine(input_ids=ids, labels=ids)
        engine.backward(loss)
        engine.step()
    engine.destroy()
    return engine


def test_log_line_has_tokens_per_second_tflops_and_eta_for_keyword_inputs(capsys, monkeypatch):
    monkeypatch.setenv("DS_PROGRESS_BAR", "0")
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 3,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 100}},
              "flops_profiler": {"enabled": True, "profile_step": 2, "detailed": True}}
    engine = _run(config)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[ds] step")]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"tokens/s [\d,.]+", line), line
        assert re.search(r"TFLOPs [\de.+-]+", line), line
        assert re.search(r"ETA \d+:\d\d:\d\d", line), line
    assert out.count("ds flops profiler") == 1 and "profile step:                  2" in out
    # one forward of 4 x 10 tokens through the head: 40 x 16 x 32 MACs (an embedding is a lookup)
    assert engine.run_report.profile.macs == 40 * 16 * 32
    assert engine.run_report.train_flops() == 3 * 2 * 40 * 16 * 32


def test_no_profile_and_no_tflops_when_disabled(capsys, monkeypatch):
    monkeypatch.setenv("DS_PROGRESS_BAR", "0")
    _run({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 3,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    out = capsys.readouterr().out
    assert "ds flops profiler" not in out and "TFLOPs" not in out and "ETA" not in out
    assert "tokens/s" in out


def test_progress_bar_on_rank_0(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("DS_PROGRESS_BAR", "1")  # stdout is not a terminal under pytest: force it
    report = RunReport({"scheduler": {"params": {"total_num_steps": 10}}}, rank=0)
    for step in range(1, 4):
        report.after_step(step, 0.5)
    report.print("[ds] a log line")
    report.close()
    out = capsys.readouterr().out
    assert "3/10" in out and "[ds] a log line" in out
    quiet = RunReport({}, rank=1)
    quiet.after_step(1, 0.5)
    assert quiet._bar is None  # other ranks never show one
