"""A bounded load test: requests arriving as a Poisson process with mixed prompt and output lengths,
against a server with a small KV cache (so requests are preempted, by swap and by recompute) and a
short queue (so some are refused).

Nothing may be lost: every request is answered (200, with the same greedy text the offline engine
gives for it alone) or refused with 429 + Retry-After; the run ends (no deadlock); afterwards every
KV block is back and nothing is queued or running. Arrival times are random but seeded, and no
assertion depends on how the timing falls out.
"""

from __future__ import annotations

import asyncio
import random

import httpx

from ds_infer.serving.config import ServingConfig
from ds_infer.serving.engine import LLMEngine
from ds_infer.serving.sampling_params import SamplingParams

from ._helpers import HANG_GUARD, MODEL, metric, serve, wait_for
from .conftest import WORDS

NUM_REQUESTS = 48
RATE = 15.0  # arrivals per second


def _workload(seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(NUM_REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        out.append((rng.expovariate(RATE), prompt, rng.randint(1, 40)))
    return out


def _offline(model, work):
    net, tok = model
    engine = LLMEngine(net, tok, ServingConfig(block_size=4, max_num_tokens=256))
    for i, (_, prompt, max_tokens) in enumerate(work):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    while engine.has_unfinished():
        engine.step()
    return [engine.output(str(i)).outputs[0].text for i in range(len(work))]


def test_poisson_arrivals_lose_nothing_and_return_every_block(model):
    work = _workload()
    expected = _offline(model, work)
    # 40 blocks of 4 tokens (160 slots) for up to 6 running requests of up to ~110 tokens each; 16 blocks
    # of swap space, so some preemptions swap and the rest recompute
    with serve(model, num_kv_blocks=40, max_model_len=160, max_num_seqs=6, max_queue_size=6, max_num_tokens=32,
               preemption_mode="swap", swap_space=16 * 1024, watermark=0.0) as handle:  # fmt: skip

        async def run():
            async with httpx.AsyncClient(base_url=handle.url, timeout=HANG_GUARD) as http:
                tasks = []
                for gap, prompt, max_tokens in work:
                    await asyncio.sleep(gap)
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                    tasks.append(asyncio.create_task(http.post("/v1/completions", json=body)))
                return await asyncio.gather(*tasks)

        responses = asyncio.run(run())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) > 0
        for r, want, (_, _, max_tokens) in zip(responses, expected, work):
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                continue
            body = r.json()
            assert body["choices"][0]["text"] == want
            assert 1 <= body["usage"]["completion_tokens"] <= max_tokens
        wait_for(lambda: metric(handle.url, "kv_blocks_used") == 0, "every block back")
        assert metric(handle.url, "requests_running") == 0 and metric(handle.url, "requests_waiting") == 0
        assert metric(handle.url, "requests_swapped") == 0
        assert metric(handle.url, "requests_rejected_total", '{reason="queue_full"}') == statuses.count(429)
        stats = handle.engine.engine.stats()
        assert stats["kv_blocks_used"] == 0 and handle.engine.engine.scheduler.swapped_blocks == 0
        assert not handle.engine.engine.requests  # every request released
