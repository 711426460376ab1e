"""Incremental detokenization equals decoding all tokens at once; stop strings cut the text."""

from __future__ import annotations

import pytest

from ds_infer.serving.tokenizer import IncrementalDetokenizer, load_tokenizer, render_chat


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir[0])


TEXTS = ["the cat sat on a mat.", "naïve café über 東京 😀 and the quick brown fox", "😀😀 東京東京 ü €ß"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tok, text):
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    seen = []
    for t in ids:
        detok.add(t)
        seen.append(detok.text)
    detok.finish()
    assert detok.text == tok.decode(ids) == text
    assert all(not s.endswith("\ufffd") for s in seen)  # half characters are held back
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # text only grows


def test_a_split_character_at_the_very_end_is_flushed(tok):
    ids = tok("€")["input_ids"]
    assert len(ids) > 1  # not in the training text: one byte-level token per UTF-8 byte
    detok = IncrementalDetokenizer(tok)
    detok.add(ids[0])
    assert detok.text == ""
    detok.finish()
    assert detok.text == tok.decode(ids[:1])


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text(tok, include):
    ids = tok("the cat sat on a mat and ran")["input_ids"]
    detok = IncrementalDetokenizer(tok, stop=("on a", "zzz"), include_stop_str_in_output=include)
    hit_at = None
    for i, t in enumerate(ids):
        if detok.add(t):
            hit_at = i
            break
    assert hit_at is not None and detok.stop_reason == "on a"
    assert detok.text == ("the cat sat on a" if include else "the cat sat ")


def test_streaming_holds_back_what_could_start_a_stop_string(tok):
    detok = IncrementalDetokenizer(tok, stop=("mat!",))
    for t in tok("the cat sat on a ma")["input_ids"]:
        detok.add(t)
    assert detok.text.endswith("ma")
    assert detok.safe_length(finished=False) == len(detok.text) - 3
    assert detok.safe_length(finished=True) == len(detok.text)


def test_stop_strings_can_be_ignored_until_min_tokens(tok):
    detok = IncrementalDetokenizer(tok, stop=("cat",))
    ids = tok("the cat sat on the cat")["input_ids"]
    hits = [detok.add(t, check_stop=i >= 3) for i, t in enumerate(ids)]
    assert hits.count(True) == 1 and detok.text == "the cat sat on the "


def test_chat_template_renders_and_missing_template_is_a_request_error(tok):
    text = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>"
    from ds_infer.serving.sampling_params import RequestError

    class Bare:
        chat_template = None

    with pytest.raises(RequestError, match="no chat template") as info:
        render_chat(Bare(), [{"role": "user", "content": "hi"}])
    assert info.value.field == "messages"
