"""A tiny random Llama and a byte-level BPE tokenizer trained here, saved side by side (no downloads)."""

from __future__ import annotations

import contextlib
import random

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("the cat dog sat on a mat and ran to house tree big small red blue green quick brown fox jumps over "
         "lazy river under bridge light dark day night sun moon star sky water fire earth wind stone road "
         "city village market bread apple river mountain café naïve über 東京 😀").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice([".", "!", "?", ","])
            for _ in range(n)]


def build_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path, vocab_size: int, eos: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
               initializer_range=0.3)  # large weights: well-separated logits, so greedy ties cannot flip
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a shared machine idle OpenMP
    workers spin against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``(path, hf_model, tokenizer)``: a 2-layer GQA Llama with a 400-token byte-level BPE vocabulary."""
    path = tmp_path_factory.mktemp("tiny-llama")
    with single_thread():
        tok = build_tokenizer(path)
        model = build_model(path, len(tok), tok.eos_token_id)
    return path, model, tok


def prompts(n: int = 32, seed: int = 1) -> list[str]:
    """Prompts of 1 to ~90 tokens (some long enough to be split into several prefill chunks)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.randint(1, 40) if i % 4 else rng.randint(40, 60)
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)))
    return out


def hf_greedy(model, tok, prompt: str | list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from Hugging Face ``generate`` for one prompt, alone (no padding)."""
    import torch

    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def hf_reference(tiny_model_dir):
    """``(prompts, token ids, texts)``: sequential HF generate, 16 greedy tokens for each of 32 prompts."""
    _, model, tok = tiny_model_dir
    ps = prompts()
    with single_thread():
        ids = [hf_greedy(model, tok, p, 16) for p in ps]
    return ps, ids, [tok.decode(t, skip_special_tokens=True) for t in ids]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """``(native model, tokenizer)`` loaded once per module, for engines and servers built in tests."""
    from ds_infer.serving.config import ServingConfig
    from ds_infer.serving.llm import build_engine

    engine = build_engine(tiny_model_dir[0], config=ServingConfig(block_size=4, num_kv_blocks=1))
    return engine.model, engine.tokenizer
