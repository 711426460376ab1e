"""Per-request sampling: filters and penalties against Hugging Face's logits processors, seeded
draws independent of the batch, greedy rows untouched by sampled ones.

Reference: transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
MinPLogitsWarper and RepetitionPenaltyLogitsProcessor on the same logits; the kept set of tokens
must be identical and the probabilities equal to 1e-6 (fp32 softmax of the same values).
"""

from __future__ import annotations

import pytest
import torch

from ds_infer.serving.sampler import Sampler, apply_penalties, filter_logits
from ds_infer.serving.sampling_params import RequestError, SamplingParams
from ds_infer.serving.sequence import Sequence

V = 64


def _seq(params, prompt=(1, 2, 3), output=(), eos=(0,)):
    seq = Sequence("r", list(prompt), params, eos_token_ids=eos)
    for t in output:
        seq.append_token(t)
    if params.seed is not None:
        seq.generator = torch.Generator().manual_seed(params.seed)
    return seq


def _hf_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("case", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
                                  dict(temperature=1.3, top_k=20, top_p=0.9)])  # fmt: skip
def test_filters_match_hugging_face(case):
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    rows = logits.shape[0]
    ours = filter_logits(
        logits,
        torch.full((rows,), case.get("temperature", 1.0)),
        torch.full((rows,), case.get("top_k", 0)),
        torch.full((rows,), case.get("top_p", 1.0)),
        torch.full((rows,), case.get("min_p", 0.0)),
    )
    ref = _hf_probs(logits, **case)
    assert torch.equal(ours > 0, ref > 0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_rows_keep_their_own_parameters():
    torch.manual_seed(1)
    logits = torch.randn(2, V) * 3
    ours = filter_logits(logits, torch.tensor([1.0, 0.5]), torch.tensor([3, 0]), torch.tensor([1.0, 0.5]),
                         torch.tensor([0.0, 0.0]))  # fmt: skip
    torch.testing.assert_close(ours[0], _hf_probs(logits[:1], top_k=3)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[1], _hf_probs(logits[1:], temperature=0.5, top_p=0.5)[0], atol=1e-6, rtol=1e-5)


def test_repetition_penalty_matches_hugging_face():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(2)
    logits = torch.randn(1, V) * 3
    seq = _seq(SamplingParams(repetition_penalty=1.7), prompt=(4, 9, 9, 30), output=(5, 4))
    ours = apply_penalties(logits.clone(), [seq])
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seq.token_ids]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_frequency_and_presence_penalties_count_output_tokens():
    logits = torch.zeros(1, V)
    seq = _seq(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt=(7,), output=(3, 3, 8))
    out = apply_penalties(logits, [seq])[0]
    assert out[3] == -(0.5 * 2 + 1.0) and out[8] == -(0.5 + 1.0) and out[7] == 0  # prompt tokens not counted


def test_min_tokens_forbids_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(2, V)
    logits[:, 0] = 10.0  # EOS would win
    logits[:, 9] = 9.0  # a stop token next
    early = _seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9]), output=(4,))
    done = _seq(SamplingParams(temperature=0, min_tokens=1), output=(4,))
    assert Sampler()(logits, [early, done]) == [int(logits[0, 1:9].argmax()) + 1, 0]


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    seqs = [_seq(SamplingParams(temperature=0)), _seq(SamplingParams(temperature=1.0, seed=5)),
            _seq(SamplingParams(temperature=0))]  # fmt: skip
    tokens = Sampler()(logits, seqs)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch():
    torch.manual_seed(4)
    logits = torch.randn(4, V)

    def draws(batch_rows):
        seq = _seq(SamplingParams(temperature=1.0, top_p=0.9, seed=1234))
        others = [_seq(SamplingParams(temperature=1.0)) for _ in batch_rows]
        out = []
        for _ in range(20):
            rows = torch.stack([logits[0], *[logits[i] for i in batch_rows]])
            out.append(Sampler(seed=len(batch_rows))(rows, [seq, *others])[0])
        return out

    assert draws([]) == draws([1, 2]) == draws([3])
    assert len(set(draws([]))) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]).clamp_min(1e-30))
    seq = _seq(SamplingParams(temperature=1.0, seed=0))
    counts = torch.zeros(4)
    sampler = Sampler()
    for _ in range(1000):
        counts[sampler(logits, [seq])[0]] += 1
    freq = counts / counts.sum()
    assert counts[3] == 0
    # > 3 sigma at n=1000; seeded, so the same draws every run
    torch.testing.assert_close(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.05, rtol=0)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("max_tokens", -3), ("repetition_penalty", 0), ("n", 0),
                                         ("presence_penalty", 3), ("stop", [""]), ("stop_token_ids", [-1]),
                                         ("min_p", 2.0), ("temperature", float("nan"))])  # fmt: skip
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(RequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
