"""The plugin registry and the `ds` command: features listed as data, ds.cli subcommands, ds report."""

import importlib.util
import json
import subprocess
import sys

import pytest

from ds_core import plugins
from ds_core.cli import main
from ds_core.errors import PluginError


def test_groups_are_fixed():
    with pytest.raises(PluginError, match="unknown plugin group 'ds.kernels'"):
        plugins.entries("ds.kernels")


@pytest.mark.smoke
def test_builtin_accelerators_registered():
    names = [ref.name for ref in plugins.entries("ds.accelerators")]
    assert {"cpu", "cuda", "privateuse1"} <= set(names)


def test_feature_spec_rejects_unknown_keys():
    with pytest.raises(PluginError, match="not part of a feature description"):
        plugins.FeatureSpec.from_mapping({"name": "x", "colour": "red"}, "x", None)


def test_feature_spec_from_file(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_feature"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('feature code must not be imported')\n")
    (pkg / "ds_feature.json").write_text(json.dumps({
        "name": "fake", "config_section": "fake_section", "capabilities": ["x"],
        "components": {"model_wrapper": "fake_feature.wrap:make"}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = plugins._describe(plugins.PluginRef("ds.features", "fake", "fake_feature", "fake-dist"))
    assert spec.config_section == "fake_section" and spec.capabilities == ("x",)
    assert "fake_feature" not in sys.modules


@pytest.mark.smoke
def test_report_json_runs_without_importing_features():
    code = ("import sys, json; from ds_core.cli.report import collect; info = collect(with_ops=False); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ds_zero','ds_pipe','ds_moe','ds_infer','ds_compress'))))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_report_prints(capsys):
    assert main(["report", "--no-ops"]) == 0
    text = capsys.readouterr().out
    assert "accelerator" in text and "chosen: cpu" in text


def test_unknown_subcommand(capsys):
    assert main(["reprot"]) == 2
    assert "did you mean 'report'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("ds_test_accel") is None,
                    reason="pip install tests/ds_core/plugins/ds-test-accel")
def test_cli_plugin_subcommand(capsys):
    plugins.clear_cache()
    assert main(["--help"]) == 0
    assert "hello" in capsys.readouterr().out
    assert main(["hello", "there"]) == 0
    assert "hello from a ds.cli plugin there" in capsys.readouterr().out
