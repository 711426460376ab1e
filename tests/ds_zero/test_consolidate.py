"""``ds zero-to-fp32`` / ``ds_zero.zero_to_fp32``: stage 0-3 checkpoints of 2 ranks -> one plain state dict."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ds_core

from ._train import config, make_model, train

X, Y = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5)), None


def _save(root, zero):
    engine = ds_core.initialize(model=make_model(), config=config(zero_optimization=zero))[0]
    train(engine, 3)
    engine.save_checkpoint(root)
    engine.eval()
    with torch.no_grad():
        return engine(X).float()


@pytest.mark.parametrize("zero", [{"stage": 0}, {"stage": 1}, {"stage": 2, "reduce_bucket_size": 3000},
                                  {"stage": 3, "stage3_param_persistence_threshold": 40}])
def test_consolidated_checkpoint_loads_into_a_plain_model(tmp_path, distributed, zero):
    from ds_zero import zero_to_fp32
    from ds_zero.cli import main

    logits = distributed.run(_save, 2, args=(tmp_path, zero))[0]
    out = tmp_path / "full.safetensors"
    if zero["stage"] == 3:  # also through the command line entry point
        assert main([str(tmp_path), str(out)]) == 0
    else:
        zero_to_fp32(tmp_path, out)
    state = load_file(str(out))
    model = make_model(seed=3)
    assert set(state) == set(model.state_dict())
    assert torch.equal(state["tok.weight"], state["head.weight"])
    assert all(v.dtype == torch.float32 for v in state.values())
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(X), logits, atol=1e-6)
    # the same state dict in memory (DeepSpeed's Python API)
    from ds_zero import get_fp32_state_dict_from_zero_checkpoint, load_state_dict_from_zero_checkpoint

    memory = get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    assert set(memory) == set(state) and all(torch.equal(memory[k], state[k]) for k in state)
    assert torch.equal(memory["tok.weight"], memory["head.weight"])
    fresh = load_state_dict_from_zero_checkpoint(make_model(seed=4), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(fresh(X), logits, atol=1e-6)


def test_ds_command_runs_and_reports_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-c", "from ds_core.cli import main; raise SystemExit(main())",
                             "zero-to-fp32", str(tmp_path / "nope"), str(tmp_path / "o.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no 'latest' file" in result.stderr, result.stderr
