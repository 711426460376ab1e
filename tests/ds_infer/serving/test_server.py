"""The OpenAI-compatible server through the official ``openai`` client on 127.0.0.1.

Servers run on free ports in background threads and are stopped by their fixtures. Nothing here
depends on timing: where a test needs requests to be in a given state it pauses the engine (which
stops forwards but still takes requests and aborts in), and waiting loops only guard against hangs.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from ._helpers import HANG_GUARD, MODEL, metric, serve, wait_for
from .conftest import hf_greedy


@pytest.fixture(scope="module")
def server(model):
    handle = serve(model)
    yield handle
    handle.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)


def _completions(url, prompts, **kwargs):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD) as client:
            return await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, **kwargs)
                                          for p in prompts])  # fmt: skip

    return asyncio.run(run())


@pytest.mark.smoke
def test_32_concurrent_completions_equal_sequential_hf_generate(server, hf_reference):
    prompts, ids, texts = hf_reference
    assert len(prompts) == 32
    responses = _completions(server.url, prompts, max_tokens=16, temperature=0)
    assert [r.choices[0].text for r in responses] == texts
    for r, ref in zip(responses, ids):
        assert r.usage.completion_tokens == len(ref)
        assert r.choices[0].finish_reason == ("stop" if len(ref) < 16 else "length")
    wait_for(lambda: metric(server.url, "kv_blocks_used") == 0, "blocks to be returned")


def test_streamed_completions_concatenate_to_the_full_text(server, hf_reference):
    prompts, _, texts = hf_reference

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD) as client:
            async def one(p):
                chunks, usage = [], None
                async for chunk in await client.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                                                   temperature=0, stream=True,
                                                                   stream_options={"include_usage": True}):
                    if chunk.choices:
                        chunks.append(chunk.choices[0].text)
                    else:
                        usage = chunk.usage
                return "".join(chunks), usage

            return await asyncio.gather(*[one(p) for p in prompts[:8]])

    results = asyncio.run(run())
    assert [text for text, _ in results] == texts[:8]
    assert all(usage is not None and usage.completion_tokens > 0 for _, usage in results)


def test_chat_completions_plain_and_streamed(client, tiny_model_dir):
    _, hf, tok = tiny_model_dir
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    ids = tok("<|system|>be brief\n<|user|>the cat sat\n<|assistant|>", add_special_tokens=False)["input_ids"]
    expected = tok.decode(hf_greedy(hf, tok, ids, 12), skip_special_tokens=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids)
    deltas, roles, reasons = [], [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                stream=True):  # fmt: skip
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        deltas += [delta.content] if delta.content else []
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert "".join(deltas) == expected and roles == ["assistant"] and reasons == [r.choices[0].finish_reason]


def test_batched_prompts_n_choices_and_echo(client, tiny_model_dir):
    _, hf, tok = tiny_model_dir
    r = client.completions.create(model=MODEL, prompt=["the cat", "a dog"], n=2, max_tokens=5, temperature=0,
                                  echo=True)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, prompt in zip(r.choices, ["the cat", "the cat", "a dog", "a dog"]):
        assert c.text == prompt + tok.decode(hf_greedy(hf, tok, prompt, 5), skip_special_tokens=True)
    ids = tok("the red sun")["input_ids"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert r.choices[0].text == tok.decode(hf_greedy(hf, tok, ids, 4), skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_over_http(client):
    kwargs = dict(model=MODEL, prompt="the moon", max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL, prompt="the sun", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("requests_waiting", "requests_running", "kv_blocks_used", "kv_cache_usage_ratio",
                 "generation_tokens_per_second", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_count", "prefix_cache_hits_total"):  # fmt: skip
        assert f"ds_serve_{name}" in text, name
    assert metric(server.url, "time_to_first_token_seconds_count") > 0
    assert metric(server.url, "inter_token_latency_seconds_count") > 0
    assert metric(server.url, "generation_tokens_total") > 0


BAD = [
    ("not json {", "body"),
    (json.dumps([1, 2]), "body"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}), "model"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -1}), "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": "hot"}), "temperature"),
    (json.dumps({"model": MODEL, "prompt": "the cat " * 200}), "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10_000}), "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": [1, 99999]}), "prompt"),
    (json.dumps({"model": MODEL}), "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "logprobs": 2}), "logprobs"),
    (json.dumps({"model": MODEL, "prompt": "hi", "stop": [""]}), "stop"),
]


def test_malformed_requests_answer_400_naming_the_field_and_disturb_nothing(server, client, tiny_model_dir):
    _, hf, tok = tiny_model_dir
    expected = tok.decode(hf_greedy(hf, tok, "the river", 60), skip_special_tokens=True)
    stream = client.completions.create(model=MODEL, prompt="the river", max_tokens=60, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks).choices[0].text  # the request is running
    for body, field in BAD:
        r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], (body, err)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-5)
    assert info.value.body["param"] == "max_tokens"
    assert first + "".join(c.choices[0].text for c in chunks) == expected


def test_api_key_is_required_when_set(model):
    with serve(model, api_key="s3cret") as handle:
        bad = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="wrong", max_retries=0, timeout=HANG_GUARD)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert httpx.post(f"{handle.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}).status_code == 401
        assert httpx.get(f"{handle.url}/v1/models").status_code == 401
        assert httpx.get(f"{handle.url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="s3cret", max_retries=0, timeout=HANG_GUARD)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_answers_429_with_retry_after(model):
    with serve(model, max_queue_size=2) as handle:
        handle.engine.pause()  # nothing runs: queued requests stay queued
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 4, "temperature": 0}

        async def run():
            async with httpx.AsyncClient(base_url=handle.url, timeout=HANG_GUARD) as http:
                queued = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
                await asyncio.to_thread(wait_for, lambda: metric(handle.url, "requests_waiting") == 2, "2 queued")
                refused = await http.post("/v1/completions", json=body)
                handle.engine.resume()
                return refused, await asyncio.gather(*queued)

        refused, queued = asyncio.run(run())
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert [r.status_code for r in queued] == [200, 200]
        assert metric(handle.url, "requests_rejected_total", '{reason="queue_full"}') == 1


def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees_blocks(model, stream):
    with serve(model) as handle:
        url = handle.url
        body = {"model": MODEL, "prompt": "the cat sat on the mat", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": stream}  # fmt: skip
        sock = _raw_request(url, body)
        wait_for(lambda: metric(url, "requests_running") == 1 and metric(url, "kv_blocks_used") > 0, "running")
        handle.engine.pause()  # from here on no forward runs: only the abort can free the blocks
        sock.close()
        wait_for(lambda: metric(url, "kv_blocks_used") == 0, "blocks freed after the disconnect")
        assert metric(url, "requests_running") == 0
        assert metric(url, "requests_finished_total", '{finish_reason="abort"}') == 1
        handle.engine.resume()


def test_requests_past_the_timeout_are_aborted(model):
    with serve(model, request_timeout=1e-9) as handle:
        r = httpx.post(f"{handle.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 50})
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="unused", max_retries=0, timeout=HANG_GUARD)
        with pytest.raises(openai.APIError, match="request_timeout"):
            for _ in client.completions.create(model=MODEL, prompt="hi", max_tokens=50, stream=True):
                pass
        wait_for(lambda: metric(handle.url, "kv_blocks_used") == 0, "blocks freed")


def test_a_failing_forward_fails_its_requests_and_the_server_serves_on(model):
    with serve(model) as handle:
        runner = handle.engine.engine.executor
        original, calls = runner.execute, []

        def flaky(plan):
            calls.append(plan)
            if len(calls) == 1:
                raise RuntimeError("injected failure")
            return original(plan)

        runner.execute = flaky
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"{handle.url}/v1/completions", json=body, timeout=HANG_GUARD)
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        assert metric(handle.url, "kv_blocks_used") == 0
        r = httpx.post(f"{handle.url}/v1/completions", json=body, timeout=HANG_GUARD)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(f"{handle.url}/health").status_code == 200


@pytest.mark.parametrize("body,field", [
    ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 300}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
])  # fmt: skip
def test_malformed_chat_requests_name_the_field(server, body, field):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
