"""The engine end to end on a tiny random Llama: the same greedy tokens as Hugging Face ``generate``
run request by request, whatever the batching, chunking, prefix sharing or preemption.

Reference: ``LlamaForCausalLM.generate(do_sample=False)`` one prompt at a time (fp32). Equality is
exact on token ids: the model's logits are well separated (initializer_range 0.3), so batching
differences in the last float bits cannot flip an argmax.
"""

from __future__ import annotations

import pytest
import torch

from ds_core.errors import ConfigError
from ds_infer.serving.config import ServingConfig
from ds_infer.serving.engine import LLMEngine
from ds_infer.serving.llm import LLM
from ds_infer.serving.sampling_params import RequestError, SamplingParams

from .conftest import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # a small token budget: prompts longer than 24 tokens are prefilled in several chunks
    return LLM(tiny_model_dir[0], max_num_tokens=24, block_size=4)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_hf_generate_request_by_request(llm, hf_reference):
    prompts, ids, texts = hf_reference
    outs = llm.generate(prompts, GREEDY)
    assert _tokens(outs) == ids
    assert [o.outputs[0].text for o in outs] == texts
    assert all(o.outputs[0].finish_reason in ("length", "stop") for o in outs)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prefix_cached_and_uncached_runs_are_identical(tiny_model_dir):
    path, _, tok = tiny_model_dir
    system = tok("the quick brown fox jumps over the lazy dog under the bridge " * 3)["input_ids"]
    prompts = [system + tok(f" {w} river")["input_ids"] for w in ("sun", "moon", "star", "sky", "day", "night")]
    runs = {}
    for caching in (True, False):
        llm = LLM(path, enable_prefix_caching=caching, block_size=4, max_num_tokens=64)
        outs = [llm.generate([p], GREEDY)[0] for p in prompts]  # one at a time: later ones can hit the cache
        runs[caching] = (_tokens(outs), [o.num_cached_tokens for o in outs], llm.engine.block_manager)
    assert runs[True][0] == runs[False][0]
    hits = runs[True][1]
    assert hits[0] == 0 and all(h >= len(system) - 4 for h in hits[1:])  # the shared blocks were reused
    assert runs[True][2].prefix_hit_rate > 0.5 and runs[False][2].prefix_hits == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_requests_give_the_unpreempted_output(tiny_model_dir, hf_reference, mode):
    prompts, ids, _ = hf_reference
    # 40 blocks of 4 tokens: about two requests at a time fit, so running ones must be preempted
    llm = LLM(tiny_model_dir[0], num_kv_blocks=40, block_size=4, max_num_tokens=48, preemption_mode=mode,
              watermark=0.0, max_model_len=160)  # fmt: skip
    outs = llm.generate(prompts[:12], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _tokens(outs) == ids[:12]
    assert llm.engine.block_manager.num_used_blocks == 0 and llm.engine.scheduler.swapped_blocks == 0


def test_ds_ops_attention_path_gives_the_same_tokens(tiny_model_dir, hf_reference):
    pytest.importorskip("ds_ops", reason="ds-ops is not installed")
    prompts, ids, _ = hf_reference
    llm = LLM(tiny_model_dir[0], attention_backend="ds_ops", block_size=4, max_num_tokens=24)
    assert llm.engine.executor.use_op
    assert _tokens(llm.generate(prompts[:6], GREEDY)) == ids[:6]


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=12)
    alone = llm.generate(["the red fox"], params)[0].outputs[0].token_ids
    crowd = llm.generate(["the red fox", "a blue moon", "the cat"], [params, SamplingParams(temperature=1.0),
                                                                   SamplingParams(temperature=0)])  # fmt: skip
    assert crowd[0].outputs[0].token_ids == alone


def test_n_choices(llm, tiny_model_dir):
    out = llm.generate("the red fox", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = llm.generate("the red fox", SamplingParams(n=2, temperature=0, max_tokens=8))[0]
    _, model, tok = tiny_model_dir
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == hf_greedy(model, tok, "the red fox", 8)


def test_stop_string_and_stop_token(llm, hf_reference):
    prompts, ids, texts = hf_reference
    i = next(k for k, t in enumerate(texts) if len(t.strip()) > 6)
    stop = texts[i][3:6]
    out = llm.generate(prompts[i], SamplingParams(temperature=0, max_tokens=16, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == texts[i][: texts[i].index(stop)]
    out = llm.generate(prompts[i], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ids[i][2]]))[0]
    assert out.outputs[0].token_ids == ids[i][:3] and out.outputs[0].stop_reason == ids[i][2]


def test_max_tokens_none_runs_to_the_context_length(tiny_model_dir):
    llm = LLM(tiny_model_dir[0], max_model_len=24, block_size=4)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 24
    assert out.outputs[0].finish_reason == "length"


def test_chat_uses_the_template(llm, tiny_model_dir):
    _, model, tok = tiny_model_dir
    out = llm.chat([{"role": "user", "content": "hello there"}], SamplingParams(temperature=0, max_tokens=6))[0]
    ids = tok("<|user|>hello there\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == hf_greedy(model, tok, ids, 6)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def engine(llm):
    """A fresh engine over the module's model, with a clock the test moves."""
    clock = Clock()
    eng = LLMEngine(llm.engine.model, llm.get_tokenizer(), ServingConfig(block_size=4, request_timeout=5.0),
                    clock=clock)  # fmt: skip
    eng.clock_ = clock
    return eng


def test_timeouts_abort_and_free_blocks(engine):
    engine.add_request("slow", "the cat sat", SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("quick", "the dog", SamplingParams(temperature=0, max_tokens=50), timeout=100.0)
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.clock_.t = 5.0
    updates = engine.step()
    timed_out = [u for u in updates if u.finish_reason == "timeout"]
    assert [u.request_id for u in timed_out] == ["slow"]
    assert engine.output("quick").outputs[0].finish_reason is None
    engine.abort("quick")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_abort_frees_blocks_before_the_next_forward(engine):
    engine.add_request("a", "the cat sat on the mat", SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    used = engine.block_manager.num_used_blocks
    assert used > 0
    updates = engine.abort("a")
    assert [u.finish_reason for u in updates] == ["abort"]
    assert engine.block_manager.num_used_blocks == 0
    assert engine.abort("a") == [] and engine.abort("unknown") == []


@pytest.mark.parametrize("prompt,params,field", [
    ("", SamplingParams(), "prompt"),
    ([5] * 300, SamplingParams(), "prompt"),
    ([5, 9999], SamplingParams(), "prompt"),
    ("the cat", SamplingParams(max_tokens=500), "max_tokens"),
])  # fmt: skip
def test_bad_requests_name_the_field(engine, prompt, params, field):
    with pytest.raises(RequestError) as info:
        engine.add_request(None, prompt, params)
    assert info.value.field == field
    assert not engine.has_unfinished()


def test_duplicate_request_ids_are_refused(engine):
    engine.add_request("same", "the cat", SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("same", "the dog", SamplingParams(max_tokens=2))


def test_config_errors_name_the_value_and_the_fix(tiny_model_dir, llm):
    with pytest.raises(ConfigError, match="max_num_token.*did you mean 'max_num_tokens'"):
        ServingConfig.build(max_num_token=3)
    with pytest.raises(ConfigError, match="kv_memory='lots'"):
        ServingConfig.build(kv_memory="lots")
    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        LLMEngine(llm.engine.model, None, ServingConfig(num_kv_blocks=4, block_size=4, max_model_len=64))
    assert ServingConfig.build(kv_memory="2GiB").kv_memory == 2 << 30


def test_engine_without_tokenizer_takes_token_ids(llm, tiny_model_dir):
    _, model, tok = tiny_model_dir
    eng = LLMEngine(llm.engine.model, None, ServingConfig(block_size=4))
    ids = tok("the cat")["input_ids"]
    eng.add_request("r", ids, SamplingParams(temperature=0, max_tokens=5))
    while eng.has_unfinished():
        eng.step()
    assert eng.output("r").outputs[0].token_ids == hf_greedy(model, tok, ids, 5)
    with pytest.raises(RequestError, match="no tokenizer"):
        eng.add_request("s", "text", SamplingParams())


def test_logits_rows_are_only_the_sampled_ones(llm):
    calls = []
    model = llm.engine.model
    original = model.compute_logits

    def spy(hidden, rows=None):
        calls.append((hidden.shape[1], None if rows is None else rows.tolist()))
        return original(hidden, rows)

    model.compute_logits = spy
    try:
        llm.generate(["the cat sat on the mat " * 6], SamplingParams(temperature=0, max_tokens=2))
    finally:
        del model.compute_logits
    assert calls and all(rows is not None and len(rows) <= 1 for _, rows in calls)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_serve_the_quantized_models_tokens(tiny_model_dir, hf_reference, quant):
    """Reference: ds_infer.generate (static KV cache) on the very same quantized model object."""
    from ds_infer import generate

    llm = LLM(tiny_model_dir[0], quant=quant, block_size=4, max_num_tokens=24)
    tok = llm.get_tokenizer()
    prompts = hf_reference[0][:4]
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt)["input_ids"]
        ref = generate(llm.engine.model, torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
        assert out.outputs[0].token_ids == ref.tolist()[: len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) == 16 or out.outputs[0].finish_reason == "stop"


@pytest.mark.cuda
def test_cuda_engine_with_the_triton_kernel_equals_hf_generate(tiny_model_dir, hf_reference):
    """On a GPU the engine picks ds_ops::paged_attention (the compiled Triton kernel) for attention."""
    pytest.importorskip("ds_ops", reason="the Triton paged-attention kernel lives in ds-ops")
    prompts, ids, _ = hf_reference
    llm = LLM(tiny_model_dir[0], device="cuda", block_size=16, max_num_tokens=64)
    assert llm.engine.executor.use_op and llm.engine.executor.cache.device.type == "cuda"
    assert _tokens(llm.generate(prompts, GREEDY)) == ids


@pytest.mark.parametrize("family", ["gpt2", "mistral", "qwen3", "mixtral"])
def test_other_families_equal_hf_generate(tmp_path, tiny_model_dir, family):
    """GPT-2 (learned positions), Mistral (sliding window 7 < the prompts, so windowed masks in both
    prefill chunks and decode), Qwen3 (q/k norms), Mixtral (MoE): the engine's tokens are HF's."""
    from .._hf import make
    from .conftest import single_thread

    tok = tiny_model_dir[2]
    eos = tok.eos_token_id
    with single_thread():
        hf = make(family, vocab_size=len(tok), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
        hf.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        prompts = ["the cat sat on a mat and ran to the house under the tree", "a", "big red fox over the river"]
        llm = LLM(tmp_path, block_size=4, max_num_tokens=16)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
        assert _tokens(outs) == [hf_greedy(hf, tok, p, 12) for p in prompts]


def test_the_training_examples_gpt_serves_after_export(tmp_path):
    """examples/train_gpt.py writes its model with ds_infer.save_pretrained + save_byte_tokenizer for
    `ds serve`; the engine gives the tokens of ds_infer.generate on the same weights."""
    import ds_infer
    from ds_core.testing.models import GPT, GPTConfig

    from .conftest import single_thread

    with single_thread():
        torch.manual_seed(0)
        engine = ds_infer.init_inference(GPT(GPTConfig(dim=32, layers=2)), replace_with_kernel_inject=True,
                                         dtype=torch.float32, device="cpu")  # fmt: skip
        ds_infer.save_pretrained(engine, tmp_path)
        ds_infer.save_byte_tokenizer(tmp_path)
        llm = LLM(tmp_path, block_size=4)
        out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        prompt = torch.tensor([list(b"hello world")])
        ref = ds_infer.generate(llm.engine.model, prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
        assert out.token_ids == ref.tolist()
        assert out.text == bytes(ref.tolist()).decode("utf-8", errors="replace")
