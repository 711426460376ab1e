"""``ds serve`` as a user runs it: a real process on a free port, the openai client against it.

The server runs with ``--tp 2``: it starts a second rank itself (spawned, gloo) and serves HTTP on
rank 0, so this also covers multi-rank serving behind one front."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from ds_core import plugins
from ds_infer.serving.api_server import free_port
from ds_infer.serving.cli import main

from ._helpers import HANG_GUARD
from .conftest import hf_greedy


@pytest.mark.smoke
def test_serve_command_is_registered():
    plugins.clear_cache()
    entry = {ref.name: ref for ref in plugins.entries("ds.cli")}["serve"]
    assert entry.load() is main


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_ds_serve_with_two_ranks_answers_and_stops_cleanly(tiny_model_dir):
    path, hf, tok = tiny_model_dir
    port = free_port()
    cmd = [sys.executable, "-m", "ds_core.cli", "serve", str(path), "--tp", "2", "--port", str(port), "--max-num-tokens", "64",
           "--kv-memory", "4MiB", "--served-model-name", "tiny", "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 5 * HANG_GUARD  # two processes importing torch on a busy machine
        while True:
            assert proc.poll() is None, f"ds serve exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "ds serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=HANG_GUARD)
        r = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
        assert r.choices[0].text == tok.decode(hf_greedy(hf, tok, "the cat", 8), skip_special_tokens=True)
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0, stream=True)
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, out
    assert "ds serve: tiny on http://127.0.0.1" in out and "tp 2" in out
