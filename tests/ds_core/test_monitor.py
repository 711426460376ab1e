"""Monitor backends (CSV contents, TensorBoard event files, wandb offline runs, missing packages),
the steps_per_print line and throughput accounting."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

import pytest

from ds_core.config import parse_config
from ds_core.engine.monitor import Monitor, Throughput, format_log_line
from ds_core.errors import ConfigError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# -- CSV ---------------------------------------------------------------------------------------------

def test_csv_one_file_per_metric_deepspeed_layout(tmp_path):
    config = parse_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "run1"}})
    monitor = Monitor(config, rank=0)
    monitor.write_events([("Train/Samples/train_loss", 2.5, 1), ("Train/Samples/lr", 1e-3, 1)])
    # flushed per write: readable before close
    assert _rows(tmp_path / "run1" / "Train_Samples_train_loss.csv") == [["step", "train_loss"], ["1", "2.5"]]
    monitor.write_events([("Train/Samples/train_loss", 2.25, 2)])
    monitor.close()
    assert _rows(tmp_path / "run1" / "Train_Samples_train_loss.csv") == [
        ["step", "train_loss"], ["1", "2.5"], ["2", "2.25"]]
    assert _rows(tmp_path / "run1" / "Train_Samples_lr.csv") == [["step", "lr"], ["1", "0.001"]]
    assert sorted(os.listdir(tmp_path / "run1")) == ["Train_Samples_lr.csv", "Train_Samples_train_loss.csv"]


def test_csv_resume_appends_without_second_header(tmp_path):
    section = {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}
    with Monitor(csv_monitor=section, rank=0) as monitor:
        monitor.write_events([("loss", 1.0, 1)])
    with Monitor(csv_monitor=section, rank=0) as monitor:
        monitor.write_events([("loss", 0.5, 2)])
    assert _rows(tmp_path / "job" / "loss.csv") == [["step", "loss"], ["1", "1.0"], ["2", "0.5"]]


def test_only_rank_zero_writes(tmp_path):
    section = {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}
    monitor = Monitor(csv_monitor=section, rank=1)
    assert not monitor.enabled
    monitor.write_events([("loss", 1.0, 1)])
    monitor.close()
    assert not (tmp_path / "job").exists()


def test_nothing_enabled_is_a_noop(tmp_path):
    monitor = Monitor(parse_config({}), rank=0)
    assert not monitor.enabled and monitor.backends == []
    monitor.write_events([("loss", 1.0, 1)])
    monitor.close()


def test_bad_section_key_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'output_path'"):
        Monitor(csv_monitor={"enabled": True, "outputpath": str(tmp_path)})


# -- TensorBoard -------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install tensorboard")
def test_tensorboard_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tensorboard={"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}, rank=0)
    monitor.write_events([("Train/Samples/train_loss", 3.0, 1), ("Train/Samples/train_loss", 2.0, 2)])
    monitor.close()
    files = os.listdir(tmp_path / "tb")
    assert any(f.startswith("events.out.tfevents") for f in files), files
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("Train/Samples/train_loss")] == [(1, 3.0), (2, 2.0)]


@pytest.mark.parametrize("rank", [0, 1])
def test_tensorboard_missing_package_is_a_config_error_on_every_rank(monkeypatch, tmp_path, rank):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Monitor(tensorboard={"enabled": True, "output_path": str(tmp_path)}, rank=rank)


# -- Weights & Biases --------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install wandb")
def test_wandb_offline_run(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = Monitor(wandb={"enabled": True, "project": "ds-test"}, rank=0)
    run = monitor.backends[0].run
    calls, real_log = [], run.log

    def log(data, step):
        calls.append((dict(data), step))
        real_log(data, step=step)

    monkeypatch.setattr(run, "log", log)
    monitor.write_events([("loss", 2.0, 1), ("lr", 0.1, 1), ("loss", 1.0, 2)])
    assert calls == [({"loss": 2.0, "lr": 0.1}, 1), ({"loss": 1.0}, 2)]  # one call per step, in order
    monitor.close()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert runs and any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


def test_wandb_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        Monitor(parse_config({"wandb": {"enabled": True}}), rank=0)


# -- log line ----------------------------------------------------------------------------------------

def test_format_log_line():
    line = format_log_line(10, 2.34567, 1e-4, 0.81234, 1234.56, 98765.4, loss_scale=65536.0, skipped=0)
    assert line == ("step 10 | loss 2.3457 | lr 1.000e-04 | grad_norm 0.8123 | samples/s 1,234.6 | "
                    "tokens/s 98,765.4 | loss_scale 65536.0000 | skipped 0")


def test_format_log_line_skips_none_and_takes_tensors_and_lr_lists():
    import torch

    line = format_log_line(3, torch.tensor(0.5), [1e-3, 2e-3], None, None, None, note="warmup")
    assert line == "step 3 | loss 0.5000 | lr [1.000e-03, 2.000e-03] | note warmup"


# -- throughput --------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeAccelerator:
    device_type = "cpu"

    def max_memory_allocated(self) -> int:
        return 3 * 2**30

    def reset_peak_memory_stats(self) -> None:
        pass


def test_throughput_excludes_warmup_and_uses_window():
    clock = FakeClock()
    tp = Throughput(window=2, warmup_steps=1, accelerator=FakeAccelerator(), clock=clock)
    clock.now = 10.0  # slow first step (warm-up): excluded
    tp.update(samples=8, tokens=800)
    assert tp.samples_per_sec is None and tp.tokens_per_sec is None
    for dt in (1.0, 2.0, 2.0):
        clock.now += dt
        tp.update(samples=8, tokens=800)
    assert tp.measured_steps == 2  # window keeps the last two
    assert tp.samples_per_sec == pytest.approx(16 / 4.0)
    assert tp.tokens_per_sec == pytest.approx(1600 / 4.0)
    clock.now += 1.0
    tp.update(samples=8)  # a step without tokens: tokens/s unknown over this window
    assert tp.tokens_per_sec is None
    assert tp.samples_per_sec == pytest.approx(16 / 3.0)


def test_throughput_memory_and_events():
    clock = FakeClock()
    tp = Throughput(accelerator=FakeAccelerator(), clock=clock)
    assert tp.peak_memory() == 3 * 2**30
    assert tp.peak_memory_per_rank() == [3 * 2**30]  # no process group: this rank only
    tp.reset_peak_memory()  # no reset on this device: a no-op, not an error
    assert tp.events(5) == [("Train/Samples/peak_memory_gib", 3.0, 5)]
    clock.now = 1.0
    tp.update(4)
    clock.now = 3.0
    tp.update(4)
    assert ("Train/Samples/samples_per_sec", 2.0, 7) in tp.events(7)


def test_throughput_real_accelerator_peak_memory_is_positive():
    assert Throughput().peak_memory() > 0


def test_throughput_rejects_bad_window():
    with pytest.raises(ConfigError, match="window 0"):
        Throughput(window=0)
