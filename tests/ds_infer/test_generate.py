"""The decode loop against transformers' ``generate`` on the same weights.

Reference: ``hf.generate`` (greedy, no early stop) — tokens must be equal, all 64 of them. The models
are tiny and random but initialised wide (std 0.2) so next-token logits are far from ties.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ds_infer
from ds_infer.generation import GenerationError, generate
from tests.ds_infer._hf import make, prompts

pytest.importorskip("transformers")


def _padded(batch=2, length=10):
    ids = prompts(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row is a shorter, left-padded prompt
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "mixtral"])
def family(request):
    hf = make(request.param)
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return request.param, hf, ids, mask, ref


def test_greedy_64_tokens_equal_transformers(family):
    _, hf, ids, mask, ref = family
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None)
    assert out.shape == ref.shape == (2, 74)
    assert torch.equal(out, ref)


def test_save_pretrained_and_checkpoint_give_the_same_tokens(family, tmp_path):
    name, hf, ids, mask, ref = family
    hf.save_pretrained(tmp_path)
    with torch.device("meta"):  # the weights come from the checkpoint only
        import transformers

        shell = type(hf)(transformers.AutoConfig.from_pretrained(tmp_path))
    engine = ds_infer.init_inference(shell, checkpoint=str(tmp_path), replace_with_kernel_inject=True)
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None), ref)
    by_dir = ds_infer.init_inference(str(tmp_path))  # a directory alone: the native path
    assert torch.equal(by_dir.generate(ids, attention_mask=mask, max_new_tokens=64, eos_token_id=None), ref)


def test_model_as_it_is_runs_our_loop_over_its_own_cache():
    hf = make("qwen3")
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    engine = ds_infer.init_inference(hf)  # no kernel injection: the transformers model itself
    assert engine.module is hf
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None), ref)
    assert torch.equal(engine.module.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                              eos_token_id=None, pad_token_id=0), ref)


def test_plain_module_without_cache_recomputes_each_step():
    from ds_core.testing.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, seq_len=48, dim=32, layers=2, heads=4)).eval()
    ids = torch.randint(0, 64, (2, 6))
    plain = ds_infer.init_inference(model).generate(ids, max_new_tokens=12)
    native = ds_infer.init_inference(model, replace_with_kernel_inject=True).generate(ids, max_new_tokens=12)
    assert torch.equal(plain, native)
    with torch.no_grad():  # and both are the argmax chain of the module's own logits
        seq = ids
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(plain, seq)
    with pytest.raises(GenerationError, match="takes no attention_mask"):
        ds_infer.init_inference(model).generate(ids, attention_mask=_padded(2, 6)[1], max_new_tokens=2)


def test_eos_stops_a_row_and_pads_it():
    hf = make("llama")
    ids = prompts(2, 8)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    free = engine.generate(ids, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 8 + 3])  # row 0's fourth new token becomes the end of sequence
    out = engine.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    first = (out[0, 8:] == eos).nonzero()[0, 0]
    assert (out[0, 8 + first + 1:] == 0).all()


def test_stop_sequence_and_streaming_callback():
    hf = make("llama")
    ids = prompts(1, 8)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    free = engine.generate(ids, max_new_tokens=10, eos_token_id=None)
    stop = free[0, 8 + 4:8 + 6].tolist()  # tokens 5 and 6 as a stop sequence
    seen = []
    out = engine.generate(ids, max_new_tokens=10, eos_token_id=None, stop=[stop],
                          streamer=lambda step, tokens: seen.append(int(tokens[0])))
    assert out.shape[1] == 8 + 6 and out[0, -2:].tolist() == stop
    assert seen == out[0, 8:].tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    hf = make("llama")
    ids = prompts(2, 6)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=None)
    a = engine.generate(ids, seed=7, **kwargs)
    b = engine.generate(ids, seed=7, **kwargs)
    assert torch.equal(a, b)
    greedy = engine.generate(ids, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(engine.generate(ids, max_new_tokens=16, do_sample=True, top_k=1, seed=3, eos_token_id=None),
                       greedy)


def test_sampling_distribution_matches_the_softmax():
    """top-p/top-k/temperature filter exactly as defined: empirical frequencies of one step."""
    from ds_infer.sampling import select, warp

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tokens = select(logits, True, temperature=0.5, top_k=3, generator=g)
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.5]) / 0.5, 0)
    freq = torch.bincount(tokens, minlength=5).float() / 4000
    assert freq[3:].sum() == 0
    assert (freq[:3] - probs).abs().max() < 0.03
    kept = warp(logits[:1], top_p=0.7).isfinite()[0]
    assert kept.tolist() == [True, True, False, False, False]  # 0.61 < 0.7 needs the second token


def test_repetition_penalty_matches_transformers():
    hf = make("llama")
    ids = prompts(2, 8)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                          pad_token_id=0)
    out = ds_infer.init_inference(hf, replace_with_kernel_inject=True).generate(
        ids, max_new_tokens=24, repetition_penalty=1.3, eos_token_id=None)
    assert torch.equal(out, ref)


def test_generate_function_and_bad_input():
    hf = make("gpt2")
    native = ds_infer.init_inference(hf, replace_with_kernel_inject=True).module
    ids = prompts(1, 5)
    assert generate(native, ids, max_new_tokens=3, eos_token_id=None).shape == (1, 8)
    with pytest.raises(GenerationError, match="unknown argument 'max_tokens'.*max_new_tokens"):
        generate(native, ids, max_tokens=3)
    with pytest.raises(GenerationError, match="padding at the end"):
        generate(native, ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(GenerationError, match="exceeds the 256 learned positions"):
        generate(native, ids, max_new_tokens=300)
    with pytest.raises(GenerationError, match="top_p 1.5"):
        generate(native, ids, max_new_tokens=2, do_sample=True, top_p=1.5)


def test_static_decode_step_is_captured_as_one_graph():
    """compile=True runs the step's static form; fullgraph=True proves it has no graph break (the
    "eager" backend skips inductor's code generation, which `compile=True` adds on top). The step
    attends over the first 64, 128, ... cache slots (StaticKVCache.static_span), not the whole
    buffer: a decode crossing slot 64 adds one graph, with the same tokens as the eager decoder
    (which attends over exactly the filled slots)."""
    import torch._dynamo.utils

    hf = make("llama", num_hidden_layers=1)
    ids, mask = _padded(2, 6)
    eager = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    ref = eager.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    long_ids, long_mask = _padded(2, 58)
    long_ref = eager.generate(long_ids, attention_mask=long_mask, max_new_tokens=12, eos_token_id=None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True,
                                     compile={"backend": "eager", "fullgraph": True})
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None), ref)
    engine.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)  # same cache: no recompile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    out = engine.generate(long_ids, attention_mask=long_mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(out, long_ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # spans 64 and 128, same cache
    cache = engine.decoder().cache
    assert cache.max_len == 256
    assert [cache.static_span(s) for s in (0, 63, 64, 127, 128, 255)] == [64, 64, 128, 128, 256, 256]



@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt2"])
def test_compile_true_on_cpu_exports_the_step_ahead_of_time(family):
    """compile=True on CPU with one rank compiles the step with AOTInductor (ds_infer/aot.py, [Note:
    ahead-of-time step]); the tokens equal the eager decoder's through the rows kernel and the MoE
    path, across a span change (slots 64 and 128), and again for a second prompt with other padding
    (the cache's mask and keys are inputs, not baked in). A dict of torch.compile options keeps
    torch.compile (with the C++ wrapper unless the user chose options)."""
    hf = make(family, num_hidden_layers=1)
    ids, mask = _padded(2, 58)
    other = torch.randint(3, 60, (2, 40), generator=torch.Generator().manual_seed(5))
    other_mask = torch.ones_like(other)
    other_mask[1, :7] = 0
    eager = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    ref = eager.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    other_ref = eager.generate(other, attention_mask=other_mask, max_new_tokens=10, eos_token_id=None)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile=True)
    dec = engine.decoder()
    assert dec.capture == "export"
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None), ref)
    assert dec.capture == "export" and dec.export_failure is None
    assert sorted(dec._exported) == [64, 128]
    out = engine.generate(other, attention_mask=other_mask, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(out, other_ref)
    assert sorted(dec._exported) == [64, 128]  # same cache: nothing rebuilt
    compiled = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile={"fullgraph": True})
    assert compiled.decoder().capture == "compile"
    assert compiled.decoder().compile_options == {"fullgraph": True, "options": {"cpp_wrapper": True}}
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None), ref)
    user = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile={"mode": "default"})
    assert user.decoder().compile_options == {"mode": "default"}  # the user's choice stands


def test_exported_step_sees_weight_changes_and_rebuilds_after_a_replaced_weight():
    """The exported step holds the model's weights by reference: an in-place change is used by the
    next step with no rebuild; a replaced weight (load_state_dict(assign=True)) is noticed at the
    next generate, which rebuilds the step rather than compute with the old tensor; so is a replaced
    layer, or a forward hook the library would skip."""
    hf = make("llama", num_hidden_layers=1)
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(2))
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile=True)
    eager = ds_infer.init_inference(hf, replace_with_kernel_inject=True)
    engine.generate(ids, max_new_tokens=4, eos_token_id=None)
    dec = engine.decoder()
    built = dict(dec._exported)
    assert built and all(s.current() for s in built.values())
    with torch.no_grad():
        for m in (engine.module, eager.module):
            m.lm_head.weight.mul_(-1.5)  # in place: the exported step reads the same memory
    out = engine.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out, eager.generate(ids, max_new_tokens=6, eos_token_id=None))
    assert dec._exported == built
    head = engine.module.lm_head
    engine.module.lm_head = copy.deepcopy(head)  # same values, another module: its weight is not the one held
    assert not any(s.current() for s in built.values())
    engine.module.lm_head = head
    handle = engine.module.model.norm.register_forward_hook(lambda *args: None)  # would not run in the library
    assert not any(s.current() for s in built.values())
    handle.remove()
    assert all(s.current() for s in built.values())
    state = {k: v.clone() * 0.5 for k, v in engine.module.state_dict().items()}
    engine.module.load_state_dict(state, assign=True)
    eager.module.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    assert not any(s.current() for s in built.values())
    out = engine.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out, eager.generate(ids, max_new_tokens=6, eos_token_id=None))
    assert dec._exported and all(s not in built.values() for s in dec._exported.values())


def test_exported_step_runs_quantized_weights_and_leaves_streamed_layers_to_torch_compile(tmp_path):
    """int8 weight-only layers (their packed weights and scales are parameters/buffers, the
    woq_linear op a custom op) export like dense ones and give the eager quantized tokens. A
    ZeRO-Inference model swaps its layers' weights every step, which an exported library would not
    see: compile=True keeps torch.compile there, and a module with forward hooks is refused."""
    from ds_infer.aot import ExportedStep, NotExportable

    hf = make("llama", num_hidden_layers=1)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = ds_infer.init_inference(hf, replace_with_kernel_inject=True, quant="int8").generate(
        ids, max_new_tokens=6, eos_token_id=None)
    engine = ds_infer.init_inference(hf, replace_with_kernel_inject=True, quant="int8", compile=True)
    assert torch.equal(engine.generate(ids, max_new_tokens=6, eos_token_id=None), ref)
    assert engine.decoder().capture == "export" and engine.decoder()._exported
    streamed = ds_infer.init_inference(hf, replace_with_kernel_inject=True, compile=True,
                                       zero={"offload": "cpu"})
    assert streamed.decoder().capture == "compile"
    cache = engine.decoder().cache
    handle = engine.module.lm_head.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(NotExportable, match="forward hooks: lm_head"):
        ExportedStep(engine.module, cache, 64)
    handle.remove()
