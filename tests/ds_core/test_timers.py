"""Timers for wall_clock_breakdown: elapsed, reset, the log line, device sync and the no-op variant."""

from __future__ import annotations

import re
import time

import pytest

from ds_core.engine.timers import NoOpTimers, Timers, make_timers


class FakeAccelerator:
    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1


def test_elapsed_accumulates_and_resets():
    timers = Timers(accelerator=FakeAccelerator("cpu"))
    for _ in range(2):
        timers("forward").start()
        time.sleep(0.01)
        timers("forward").stop()
    assert timers("forward").count == 2
    ms = timers("forward").elapsed(reset=False)
    assert 15 <= ms < 1000
    assert timers("forward").elapsed() == pytest.approx(ms)
    assert timers("forward").elapsed() == 0.0


def test_elapsed_of_running_timer_keeps_it_running():
    timers = Timers(accelerator=FakeAccelerator("cpu"))
    timers("step").start()
    time.sleep(0.005)
    assert timers("step").elapsed() > 0
    assert timers("step").running
    timers("step").stop()


def test_start_twice_and_stop_idle_error():
    timers = Timers(accelerator=FakeAccelerator("cpu"))
    timers("a").start()
    with pytest.raises(RuntimeError, match="'a' is already running"):
        timers("a").start()
    timers("a").stop()
    with pytest.raises(RuntimeError, match="'a' is not running"):
        timers("a").stop()


def test_log_line_format_normalizer_and_unknown_names():
    timers = Timers(accelerator=FakeAccelerator("cpu"))
    for name in ("forward", "backward"):
        with timers(name):
            time.sleep(0.002)
    line = timers.log(["forward", "backward", "never_started"], normalizer=2)
    assert re.fullmatch(r"time \(ms\) \| forward: \d+\.\d\d \| backward: \d+\.\d\d", line), line
    assert timers.log(["forward"]) == "time (ms) | forward: 0.00"  # reset by the previous log
    assert timers.log(["nothing"]) == ""
    with pytest.raises(ValueError, match="normalizer"):
        timers.log(["forward"], normalizer=0)


def test_synchronizes_only_off_cpu():
    cpu, gpu = FakeAccelerator("cpu"), FakeAccelerator("cuda")
    for acc in (cpu, gpu):
        timers = Timers(accelerator=acc)
        timers("x").start()
        timers("x").stop()
    assert cpu.syncs == 0
    assert gpu.syncs == 2
    forced = FakeAccelerator("cpu")
    Timers(synchronize=True, accelerator=forced)("x").start()
    assert forced.syncs == 1


def test_noop_timers_same_interface():
    timers = make_timers(False)
    assert isinstance(timers, NoOpTimers) and not timers.enabled
    t = timers("forward").start()
    assert t.stop() == 0.0
    with timers("backward"):
        pass
    assert timers("forward").elapsed() == 0.0
    assert timers.log(["forward", "backward"]) == ""
    assert timers.elapsed(["forward"]) == {} and timers.names == []
    assert timers("a") is timers("b")  # one shared object: no allocation per call
    assert isinstance(make_timers(True, accelerator=FakeAccelerator("cpu")), Timers)

