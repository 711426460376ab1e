"""Hugging Face models under ZeRO stage 3: a tiny GPT-2 built from a config (no download) under
``ds_zero.Init``, every parameter partitioned (``stage3_param_persistence_threshold: 0``), 2 gloo ranks.

References and tolerances:
- HF's weight initialisation (``post_init``) runs on the partitioned parameters: the weights equal those
  of the same model built without ``Init`` from the same seed (exactly), so the embedding's std is the
  config's ``initializer_range`` (0.02) and the first loss is about ln(vocab);
- ``resize_token_embeddings`` on the partitioned model equals resizing the plain model (exactly with
  ``mean_resizing=False``; to 1e-5 with HF's default mean resizing, whose covariance matmul runs on
  differently aligned memory);
- training equals DDP on the plain model to 1e-5 (losses over 4 steps, fp32 AdamW, clipping);
- ``generate()`` after training gives DDP's model's tokens, and scores within 1e-3 of its (the weights
  agree to about 1e-6 after the 4 AdamW steps);
- ``save_pretrained`` outside a gather raises naming a parameter; inside ``GatheredParameters`` it
  writes the real weights: reloaded with ``from_pretrained`` they give the engine's logits and
  ``generate`` scores (1e-6).
"""

import math
import os

import pytest
import torch
import torch.distributed as dist

VOCAB, NEW_VOCAB = 96, 104
LR, CLIP, MICRO, STEPS = 3e-3, 1.0, 4, 4


def _config():
    from transformers import GPT2Config

    # dropout 0: the reference and the engine share one RNG stream in each process
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _plain_and_partitioned():
    from transformers import GPT2LMHeadModel

    import ds_zero

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(_config())
    torch.manual_seed(0)
    with ds_zero.Init():
        model = GPT2LMHeadModel(_config())
    return plain, model


def _full_state(model) -> dict:
    import ds_zero

    with ds_zero.GatheredParameters(list(model.parameters())):
        return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.world_size(2)
def test_hf_init_and_resize_run_on_partitioned_parameters():
    import ds_zero
    from ds_zero import is_zero_init_parameter

    _quiet()
    plain, model = _plain_and_partitioned()
    assert all(is_zero_init_parameter(p) and not p.ds_shard.gathered for p in model.parameters())
    assert model.transformer.wte.weight.shape == (VOCAB, 32)  # shapes stay readable
    ours = _full_state(model)
    for k, v in plain.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert abs(ours["transformer.wte.weight"].std().item() - 0.02) < 2e-3  # not nn.Embedding's 1.0

    torch.manual_seed(1)
    model.resize_token_embeddings(NEW_VOCAB)  # HF's default: mean resizing
    torch.manual_seed(1)
    plain.resize_token_embeddings(NEW_VOCAB)
    wte = model.transformer.wte.weight
    assert wte.shape == (NEW_VOCAB, 32) and model.lm_head.weight is wte and is_zero_init_parameter(wte)
    assert not wte.ds_shard.gathered and wte.ds_shard.numel == NEW_VOCAB * 32
    resized = _full_state(model)["transformer.wte.weight"]
    assert torch.equal(resized[:VOCAB], plain.transformer.wte.weight[:VOCAB])
    torch.testing.assert_close(resized, plain.transformer.wte.weight, atol=1e-5, rtol=0)
    assert model.config.vocab_size == NEW_VOCAB
    with pytest.raises(ds_zero.ReleasedParameterError, match="ds_core.initialize"):
        _engine(model).module.resize_token_embeddings(NEW_VOCAB + 8)  # adopted: the engine's layout is fixed


def _engine(model):
    import ds_core

    return ds_core.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": CLIP, "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": LR}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})[0]


@pytest.mark.world_size(2)
def test_hf_gpt2_trains_generates_and_saves_under_stage3(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    import ds_zero
    from ds_core.testing.models import synthetic_tokens

    _quiet()
    plain, model = _plain_and_partitioned()
    torch.manual_seed(1)
    model.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    torch.manual_seed(1)
    plain.resize_token_embeddings(NEW_VOCAB, mean_resizing=False)
    engine = _engine(model)
    ddp = torch.nn.parallel.DistributedDataParallel(plain)
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
    ours, ref = [], []
    for step in range(STEPS):
        x, _ = synthetic_tokens(MICRO, 16, NEW_VOCAB, step, dist.get_rank())
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        ours.append(loss.item())
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-5, (ours, ref)
    assert abs(ours[0] - math.log(NEW_VOCAB)) < 0.1  # HF's init, not N(0, 1) embeddings (loss ~41)

    prompt = torch.tensor([[1, 2, 3, 4]])
    engine.module.eval()
    plain.eval()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    got, want = engine.module.generate(prompt, **kw), plain.generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-3, rtol=0)

    # save_pretrained outside a gather: an error naming a parameter, on every rank that calls it
    out = tmp_path_factory.mktemp("hf") if dist.get_rank() == 0 else None
    path = [str(out) if out is not None else None]
    dist.broadcast_object_list(path)
    with pytest.raises(ds_zero.ReleasedParameterError, match=r"parameter transformer\.\S+|parameter lm_head"):
        engine.module.save_pretrained(os.path.join(path[0], f"refused{dist.get_rank()}"))
    with ds_zero.GatheredParameters(list(engine.module.parameters())):
        if dist.get_rank() == 0:
            engine.module.save_pretrained(os.path.join(path[0], "model"))
    dist.barrier()
    reloaded = GPT2LMHeadModel.from_pretrained(os.path.join(path[0], "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, engine.module(prompt).logits, atol=1e-6, rtol=0)
    again = reloaded.generate(prompt, **kw)
    assert torch.equal(again.sequences, got.sequences)
    torch.testing.assert_close(torch.stack(again.scores), torch.stack(got.scores), atol=1e-6, rtol=0)
