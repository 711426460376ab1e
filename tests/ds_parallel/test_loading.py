"""A model built on the meta device, sharded, each rank reading only its slices from safetensors.

Checkpoints are Hugging Face ``save_pretrained`` directories split into several files with a
``model.safetensors.index.json``. Reference: the full model's tensors (each shard must hold exactly
its rows) and its logits (eval, no grad: 1e-5).
"""

import pytest
import torch

from ds_core.errors import ConfigError
from ds_core.testing.harness import run_distributed
from ds_parallel import TensorGroup, find_plan, from_pretrained, load_sharded, meta_init
from ds_parallel.apply import apply_plan
from ds_parallel.shards import take_runs

from ._models import hf_config, hf_model


def _save(family, path):
    model = hf_model(family)
    model.save_pretrained(path, max_shard_size="20KB")
    return model


@pytest.mark.parametrize("family", ["llama_kv3", "gpt2", "falcon"])
def test_each_rank_loads_exactly_its_rows_from_a_sharded_directory(tmp_path, family):
    import transformers as t

    full = _save(family, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reference = dict(full.named_parameters())
    for rank in range(2):
        with meta_init():
            model = t.AutoModelForCausalLM.from_config(hf_config(family))
        assert all(p.is_meta for p in model.parameters())
        apply_plan(model, find_plan(model), TensorGroup(size=2, rank=rank))
        load_sharded(model, tmp_path)
        for name, p in model.named_parameters():
            info = getattr(p, "ds_tp", None)
            owner = name.rsplit(".", 1)[0]
            ref = reference[name] if info is None else take_runs(reference[f"{owner}.{info.target}"], info.dim,
                                                                   info.runs)
            assert torch.equal(p, ref), name


def test_missing_tensors_are_named(tmp_path):
    import transformers as t
    from safetensors.torch import save_file

    full = hf_model("llama")
    state = {k: v for k, v in full.state_dict().items() if "layers.1." not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with meta_init():
        model = t.AutoModelForCausalLM.from_config(hf_config("llama"))
    with pytest.raises(ConfigError, match=r"lacks \d+ tensors of LlamaForCausalLM: model.layers.1"):
        load_sharded(model, tmp_path)


def _two_rank_from_pretrained(paths):
    out = {}
    for family, path in paths.items():
        model = from_pretrained(path, tp_size=2)
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(ids).logits
        out[family] = (logits, model.get_submodule(QUERY[family]).weight.numel())
    return out


QUERY = {"llama_kv3": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    models, paths = {}, {}
    for family in QUERY:
        path = tmp_path_factory.mktemp(family)
        models[family] = _save(family, path).eval()
        paths[family] = str(path)
    return models, run_distributed(_two_rank_from_pretrained, 2, args=(paths,))


@pytest.mark.parametrize("family", list(QUERY))
def test_from_pretrained_on_two_ranks_matches_the_full_model(saved, family):
    models, results = saved
    full = models[family]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = full(ids).logits
    for rank in results:
        logits, numel = rank[family]
        torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)
        assert numel * 2 == full.get_submodule(QUERY[family]).weight.numel()  # half the query projection each
