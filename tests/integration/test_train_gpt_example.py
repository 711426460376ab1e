"""The README's main job, shortened: `ds run` starts 2 CPU ranks of examples/train_gpt.py."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_gpt_runs_through_ds_run(tmp_path):
    # `python -m ds_core`, not a `ds` on PATH: DeepSpeed (a test dependency) installs a `ds` script too
    cmd = [sys.executable, "-m", "ds_core", "run", "--nproc", "2", str(ROOT / "examples/train_gpt.py"),
           "--config", str(ROOT / "examples/configs/gpt_cpu.json"), "--steps", "12",
           "--dim", "32", "--layers", "1", "--seq-len", "32", "--corpus-bytes", "200000",
           "--save-dir", str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[ds] step 10 | loss" in out.stdout
    assert "[train_gpt] done: 12 steps" in out.stdout
    assert "loaded by ds_infer.init_inference" in out.stdout  # the checkpoint, generating a sample
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step12"
    assert (tmp_path / "runs" / "train_gpt" / "Train_Samples_train_loss.csv").exists()
