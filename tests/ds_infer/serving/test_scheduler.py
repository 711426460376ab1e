"""The scheduler driven by a simulated model, with the KV contents checked at every step.

The simulated model's next token is a fixed function of all tokens so far, and the "KV" a step
writes at position ``p`` is a fingerprint of tokens ``0..p``: before each step every context slot a
sequence reads must hold its own prefix's fingerprint. That catches a wrong block table, a shared
block overwritten, a stale prefix hit, or a swap copy put back in the wrong place, without a model.
"""

from __future__ import annotations

import random

import pytest

from ds_infer.serving.block_manager import BlockManager
from ds_infer.serving.sampling_params import SamplingParams
from ds_infer.serving.scheduler import Scheduler
from ds_infer.serving.sequence import Sequence, SequenceStatus

VOCAB = 50


def next_token(tokens) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % VOCAB


class Sim:
    def __init__(self, num_blocks, block_size, max_num_tokens, max_num_seqs=64, mode="recompute",
                 swap_blocks=0, watermark=0.0, prefix=True):  # fmt: skip
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix, watermark=watermark)
        self.sched = Scheduler(self.bm, max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs,
                               preemption_mode=mode, swap_capacity_blocks=swap_blocks)  # fmt: skip
        self.slots: dict[int, tuple] = {}
        self.done: list[Sequence] = []
        self.admitted: list[str] = []
        self.steps = 0

    def slot(self, seq, p):
        return seq.block_ids[p // self.bm.block_size] * self.bm.block_size + p % self.bm.block_size

    def add(self, name, prompt, max_tokens, t=0.0):
        seq = Sequence(name, list(prompt), SamplingParams(max_tokens=max_tokens), arrival_time=t)
        self.sched.add(seq)
        return seq

    def step(self):
        out = self.sched.schedule()
        self.steps += 1
        assert out.num_tokens <= self.sched.max_num_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        for seq, blocks in out.swap_out:
            seq.swapped_kv = [self.slots[b * self.bm.block_size + i] if b * self.bm.block_size + i in self.slots
                              else None for b in blocks for i in range(self.bm.block_size)]  # fmt: skip
        for seq, blocks in out.swap_in:
            for j, value in enumerate(seq.swapped_kv):
                self.slots[blocks[j // self.bm.block_size] * self.bm.block_size + j % self.bm.block_size] = value
            seq.swapped_kv = None
        for seq, n in out.scheduled:
            if not seq.admitted or seq.request_id not in self.admitted:
                self.admitted.append(seq.request_id)
            assert seq.status is SequenceStatus.RUNNING
            start = seq.num_computed_tokens
            assert len(seq.block_ids) * self.bm.block_size >= start + n
            for p in range(start):  # everything already computed is really there
                assert self.slots.get(self.slot(seq, p)) == tuple(seq.token_ids[: p + 1]), (seq, p)
            for p in range(start, start + n):
                self.slots[self.slot(seq, p)] = tuple(seq.token_ids[: p + 1])
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.bm.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(next_token(seq.token_ids))
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.finish(seq, "length")
                    self.done.append(seq)
        self.bm.check_invariants()
        return out

    def run(self, limit=10_000):
        while self.sched.has_work():
            self.step()
            assert self.steps < limit, "no progress: the scheduler deadlocked"


def expected_output(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def test_decodes_and_prefill_chunks_share_the_token_budget():
    sim = Sim(num_blocks=64, block_size=4, max_num_tokens=8)
    a = sim.add("a", range(1, 4), 6)
    sim.step()  # a's whole prompt
    b = sim.add("b", range(10, 30), 3)  # 20-token prompt
    out = sim.step()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 7)]  # decode first, then a chunk
    out = sim.step()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 7)]
    sim.run()
    assert a.output_token_ids == expected_output(range(1, 4), 6)
    assert b.output_token_ids == expected_output(range(10, 30), 3)


def test_waiting_requests_are_admitted_first_come_first_served():
    sim = Sim(num_blocks=6, block_size=4, max_num_tokens=64)
    sim.add("big", range(20), 2, t=0)  # 6 blocks once it has decoded: fills the cache
    sim.add("second", range(100, 108), 1, t=1)
    sim.add("small", [7], 1, t=2)  # would fit earlier, but must not overtake "second"
    sim.run()
    assert sim.admitted == ["big", "second", "small"]
    assert [s.request_id for s in sim.done][:1] == ["big"]


@pytest.mark.parametrize("mode,swap_blocks", [("recompute", 0), ("swap", 64), ("swap", 3)])
def test_preempted_requests_finish_with_the_same_tokens(mode, swap_blocks):
    # 12 blocks of 4 tokens for 4 requests that need up to 6 blocks each: preemption is certain
    sim = Sim(num_blocks=12, block_size=4, max_num_tokens=16, mode=mode, swap_blocks=swap_blocks)
    prompts = {f"r{i}": list(range(i * 10, i * 10 + 6 + i)) for i in range(4)}
    seqs = {name: sim.add(name, p, 14, t=i) for i, (name, p) in enumerate(prompts.items())}
    sim.run()
    assert sim.sched.num_preemptions > 0
    for name, seq in seqs.items():
        assert seq.output_token_ids == expected_output(prompts[name], 14), name
    assert sim.bm.num_free_blocks == 12 and sim.sched.swapped_blocks == 0


def test_the_oldest_request_is_never_preempted():
    sim = Sim(num_blocks=8, block_size=2, max_num_tokens=32)
    oldest = sim.add("oldest", range(5), 10, t=0)
    for i in range(3):
        sim.add(f"r{i}", range(50 + i, 55 + i), 10, t=1 + i)
    sim.run()
    assert oldest.num_preemptions == 0 and sim.sched.num_preemptions > 0


def test_an_idle_engine_admits_its_head_into_the_watermark():
    sim = Sim(num_blocks=4, block_size=4, max_num_tokens=64, watermark=0.5)
    seq = sim.add("a", range(12), 3)  # needs 3 of 4 blocks; the watermark keeps 2 back
    sim.run(limit=50)
    assert seq.output_token_ids == expected_output(range(12), 3)


def test_shared_prefixes_are_reused_and_outputs_unchanged():
    system = list(range(100, 124))  # 24 tokens: 6 full blocks of 4
    cached = Sim(num_blocks=128, block_size=4, max_num_tokens=32)
    plain = Sim(num_blocks=128, block_size=4, max_num_tokens=32, prefix=False)
    outs = []
    for sim in (cached, plain):
        seqs = [sim.add(f"q{i}", system + [i, i + 1], 5, t=i) for i in range(6)]
        sim.run()
        outs.append([s.output_token_ids for s in seqs])
    assert outs[0] == outs[1]
    assert cached.bm.prefix_hits > 0 and plain.bm.prefix_hits == 0
    assert cached.steps <= plain.steps


def test_max_num_seqs_bounds_the_running_set():
    sim = Sim(num_blocks=64, block_size=4, max_num_tokens=64, max_num_seqs=2)
    for i in range(5):
        sim.add(f"r{i}", [i, i + 1], 3, t=i)
    sim.run()
    assert len(sim.done) == 5


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_finish_and_return_every_block(seed):
    rng = random.Random(seed)
    mode = ["recompute", "swap"][seed % 2]
    sim = Sim(num_blocks=rng.randint(10, 20), block_size=rng.choice([2, 4]), max_num_tokens=rng.choice([5, 16, 40]),
              max_num_seqs=rng.choice([3, 8, 64]), mode=mode, swap_blocks=rng.randint(0, 12),
              watermark=rng.choice([0.0, 0.1]))  # fmt: skip
    shared = [rng.randrange(VOCAB) for _ in range(8)]
    expected = {}
    t = 0
    for i in range(30):
        prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        # the engine refuses a request longer than the whole cache (max_model_len <= capacity)
        capacity = sim.bm.num_blocks * sim.bm.block_size
        prompt = prompt[: capacity - 1]
        max_tokens = min(rng.randint(1, 12), capacity - len(prompt))
        expected[f"r{i}"] = expected_output(prompt, max_tokens)
        sim.add(f"r{i}", prompt, max_tokens, t=t)
        t += 1
        if rng.random() < 0.5:
            sim.step()
    sim.run()
    assert {s.request_id: s.output_token_ids for s in sim.done} == expected
    assert sim.bm.num_free_blocks == sim.bm.num_blocks
    assert sim.admitted == sorted(sim.admitted, key=lambda name: int(name[1:]))  # FCFS


def test_finish_removes_a_request_from_any_queue():
    sim = Sim(num_blocks=16, block_size=4, max_num_tokens=4, mode="swap", swap_blocks=16)
    running = sim.add("running", range(6), 10, t=0)
    waiting = sim.add("waiting", range(6), 10, t=1)
    sim.step()
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    sim.sched.finish(waiting, "abort")
    sim.sched.finish(running, "abort")
    assert not sim.sched.has_work() and sim.bm.num_free_blocks == 16
