"""Helpers of the server tests: start a server on a free port, read its metrics, wait without hanging."""

from __future__ import annotations

import time

import httpx

from ds_infer.serving.api_server import start_server
from ds_infer.serving.config import ServingConfig
from ds_infer.serving.engine import LLMEngine

MODEL = "tiny"
HANG_GUARD = 120.0  # seconds; only ever reached if something is broken


def wait_for(condition, what: str):
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def metric(url: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"ds_serve_{name}{labels} "):
            return float(line.split()[-1])
    raise AssertionError(f"metric ds_serve_{name}{labels} not found")


def serve(model, **options):
    """A server over ``model`` (the ``model`` fixture's (net, tokenizer)) with a fresh engine."""
    net, tok = model
    options.setdefault("block_size", 4)
    options.setdefault("max_num_tokens", 32)
    api_key = options.pop("api_key", None)
    return start_server(LLMEngine(net, tok, ServingConfig(**options)), model_name=MODEL, api_key=api_key)
