"""The ds_ops catalogue: ops defined through ds.ops, kernels per device, report rows, plug-in path."""

from __future__ import annotations

import warnings

import pytest
import torch

from ds_ops import registry

OPS = {"adam_step", "adagrad_step", "lion_step", "aio_pread", "aio_pwrite", "woq_linear", "decode_linear"}


def test_register_is_cheap_and_lists_every_op(tmp_path, monkeypatch, fresh_build):
    monkeypatch.setenv("DS_OPS_CACHE", str(tmp_path / "empty-cache"))
    provider = registry.register()
    assert provider is registry.register()  # one provider per process
    rows = provider.report_rows()
    assert all(len(row) == 4 and all(isinstance(c, str) for c in row) for row in rows)
    by_op = {}
    for op, device, kernel, status in rows:
        by_op.setdefault(op, {})[device] = (kernel, status)
    assert OPS <= set(by_op)
    for op in OPS:
        assert by_op[op]["any"] == ("pytorch default", "ready")
        assert "c++" in by_op[op]["cpu"][0]
        assert by_op[op]["cpu"][1].startswith(("buildable", "built", "loaded", "unavailable"))
    # listing compiled nothing
    assert not list((tmp_path / "empty-cache").glob("**/*.so"))


def test_ds_core_resolves_our_ops():
    from ds_core import ops

    assert ops.get_op("adam_step") is torch.ops.ds_ops.adam_step
    assert ops.get_op("no_such_op", default=len) is len
    assert "ds_ops" in ops.providers()


def test_ds_report_shows_ops():
    from ds_core.cli.report import collect

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = collect()
    listed = {row[1] for row in info["ops"] if row[0] == "ds_ops"}
    assert OPS <= listed


def test_register_kernel_for_a_device():
    @registry.custom_op("test_scale_", mutates_args=("x",))
    def test_scale_(x: torch.Tensor, factor: float) -> None:
        x.mul_(factor)

    calls = []

    def vendor_kernel(x, factor):
        calls.append(factor)
        x.add_(factor)

    registry.register_kernel("test_scale_", "cpu", vendor_kernel, kernel="acme", status="ready here")
    x = torch.ones(3)
    torch.ops.ds_ops.test_scale_(x, 2.0)
    assert calls == [2.0] and torch.equal(x, torch.full((3,), 3.0))
    rows = [r for r in registry.register().report_rows() if r[0] == "test_scale_"]
    assert ("test_scale_", "cpu", "acme", "ready here") in rows


def test_register_kernel_unknown_op_names_known_ones():
    with pytest.raises(registry.OpInputError, match="no op ds_ops::adam_stepp.*adam_step"):
        registry.register_kernel("adam_stepp", "cpu", lambda *a: None)


def test_missing_and_broken_op_modules_are_reported_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "ds_broken_ops_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "OP_MODULES",
                        [*registry.OP_MODULES, "ds_ops.triton_not_here_", "ds_broken_ops_mod"])
    monkeypatch.setattr(registry, "_module_errors", {})
    with pytest.warns(RuntimeWarning, match="ds_broken_ops_mod failed to import: RuntimeError: boom"):
        provider = registry.register()
    rows = {r[0]: r for r in provider.report_rows()}
    assert rows["ds_ops.triton_not_here_"][3].startswith("not available")
    assert "boom at import" in rows["ds_broken_ops_mod"][3]
    assert torch.ops.ds_ops.adam_step is not None  # the other ops are still there
