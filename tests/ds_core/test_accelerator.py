"""Accelerator discovery through entry points, including a third-party plugin package.

The plugin package lives in tests/ds_core/plugins/ds-test-accel and is installed by the nox sessions;
its accelerators become active only when DS_TEST_ACCEL_ACTIVE names them.
"""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from ds_core import plugins
from ds_core.accelerator import Accelerator, get_accelerator, set_accelerator
from ds_core.accelerator.builtin import CpuAccelerator, PrivateUse1Accelerator
from ds_core.errors import AcceleratorError

needs_plugin = pytest.mark.skipif(importlib.util.find_spec("ds_test_accel") is None,
                                  reason="pip install tests/ds_core/plugins/ds-test-accel")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("DS_TEST_ACCEL_ACTIVE", raising=False)
    set_accelerator(None)
    plugins.clear_cache()
    yield
    set_accelerator(None)
    plugins.clear_cache()


def test_cpu_is_default_here():
    acc = get_accelerator()
    assert acc.name == "cpu" and isinstance(acc, Accelerator)
    assert acc.communication_backend() == "gloo"
    assert get_accelerator() is acc  # resolved once


def test_builtin_delegates_to_torch():
    acc = CpuAccelerator()
    assert acc.device() == torch.device("cpu")
    assert acc.module is torch.cpu
    assert acc.max_memory_allocated() > 0


def test_privateuse1_inactive_without_backend():
    assert PrivateUse1Accelerator().is_available() is False


def test_unknown_name_lists_available(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cdua")
    with pytest.raises(AcceleratorError, match=r"'cdua'.*did you mean 'cuda'.*available: .*cpu"):
        get_accelerator()


def test_named_but_unavailable(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("cuda is available on this machine")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(AcceleratorError, match="probe reports it unavailable"):
        get_accelerator()


@needs_plugin
def test_third_party_discovered_and_selected(monkeypatch):
    monkeypatch.setenv("DS_TEST_ACCEL_ACTIVE", "testaccel")
    with pytest.warns(RuntimeWarning, match="brokenaccel"):
        acc = get_accelerator()
    assert acc.name == "testaccel"
    assert acc.communication_backend() == "testgloo"
    assert any(name == "brokenaccel" for _, name, _ in plugins.failures())


@needs_plugin
def test_two_active_third_party_is_an_error(monkeypatch):
    monkeypatch.setenv("DS_TEST_ACCEL_ACTIVE", "testaccel,testaccel2")
    with pytest.warns(RuntimeWarning), pytest.raises(AcceleratorError, match="testaccel, testaccel2.*DS_ACCELERATOR"):
        get_accelerator()


@needs_plugin
def test_env_override_imports_only_the_chosen(monkeypatch):
    monkeypatch.setenv("DS_TEST_ACCEL_ACTIVE", "testaccel,testaccel2")
    monkeypatch.setenv("DS_ACCELERATOR", "testaccel2")
    assert get_accelerator().name == "testaccel2"
    assert plugins.failures() == []  # the broken plugin was never imported


@needs_plugin
def test_plugin_backend_used_for_process_group(tmp_path):
    """A fresh process: init_distributed takes the collective backend from the chosen plugin."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from ds_core.comm import init_distributed, all_reduce
        init_distributed()
        t = torch.ones(3)
        all_reduce(t)
        print(dist.get_backend(), t.tolist())
    """)
    env = {"DS_TEST_ACCEL_ACTIVE": "testaccel", "MASTER_PORT": "0", "PATH": "/usr/bin:/bin"}
    from ds_core.testing import free_port

    env["MASTER_PORT"] = str(free_port())
    import os

    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "testgloo"


def _train_on_the_plugin(path):
    import ds_core
    from ds_core.testing.models import GPT, GPTConfig, synthetic_tokens

    acc = get_accelerator()
    cfg = GPTConfig(vocab_size=32, seq_len=8, dim=16, layers=1, heads=2)
    torch.manual_seed(0)
    engine, *_ = ds_core.initialize(model=GPT(cfg), config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 2, "wall_clock_breakdown": True,
        "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "comms_logger": {"enabled": True}})
    rank = torch.distributed.get_rank()
    losses = []
    for _ in range(4):  # the same batch: the loss must fall
        loss = engine(*synthetic_tokens(2, cfg.seq_len, cfg.vocab_size, 0, rank))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    engine.throughput.reset_peak_memory()
    engine.save_checkpoint(path, tag="t")
    engine.load_checkpoint(path, tag="t")
    return acc.name, type(acc).__mro__[1] is object, dict(acc.calls), losses


@needs_plugin
def test_an_accelerator_implementing_only_the_protocol_runs_the_engine(tmp_path):
    """The test plugin's accelerator has no ds base class: selection checks it against the protocol, and
    the engine (device, timers, monitor, comms logger, ZeRO, checkpoints) uses nothing else."""
    from ds_core.testing import run_distributed

    out = run_distributed(_train_on_the_plugin, 2, args=(str(tmp_path),), env={"DS_TEST_ACCEL_ACTIVE": "testaccel"},
                          timeout=300)
    for name, no_base, calls, losses in out:
        assert name == "testaccel" and no_base
        assert calls.get("device", 0) >= 1  # (no synchronize or pinned-memory question: a CPU device type)
        assert calls.get("reset_peak_memory_stats") == 1
        assert losses[-1] < losses[0]
    assert out[0][3] != out[1][3]  # each rank its own data


def test_a_plugin_missing_protocol_members_is_named(monkeypatch):
    class Partial:
        name, device_type, priority, visible_devices_env = "partial", "cpu", 1, None
        capabilities = frozenset({"fp32"})

        def is_available(self):
            return True

        def communication_backend(self):
            return "gloo"

    with pytest.raises(AcceleratorError, match=r"missing device\(\), device_count\(\), set_device\(\), "
                                               r"synchronize\(\), supports\(\), memory_allocated\(\), "
                                               r"max_memory_allocated\(\), reset_peak_memory_stats\(\)"):
        set_accelerator(Partial())
