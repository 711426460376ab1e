"""Native models against transformers on the same weights: logits, cached decoding, loading, RoPE.

Reference: the transformers model the native one was built from. Tolerance: 1e-4 on fp32 logits
(the kernels differ only in summation order; in practice they agree to ~1e-7).
"""

from __future__ import annotations

import pytest
import torch

from ds_infer.models import CheckpointError, NoCache, StaticKVCache, from_module, load_model
from tests.ds_infer._hf import SPECS, make, prompts

pytest.importorskip("transformers")

FAMILIES = list(SPECS)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    hf = make(request.param)
    return request.param, hf, from_module(hf)


def test_logits_match_transformers(pair):
    _, hf, ours = pair
    ids = prompts(2, 12)
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(ours.score(ids), ref, atol=1e-4, rtol=0)


def test_static_cache_prefill_then_decode_equals_full_forward(pair):
    name, hf, ours = pair
    ids = prompts(2, 14)
    with torch.no_grad():
        ref = hf(ids).logits
    cache = StaticKVCache(ours.kv_spec(), batch=2, max_len=32)
    cache.reset()
    positions = torch.arange(14).expand(2, 14)
    cache.begin(5)
    logits = [ours.compute_logits(ours(ids[:, :5], positions[:, :5], cache)).view(2, 5, -1)]
    cache.end()
    cache.begin(3)  # a chunk of several tokens on top of a filled cache
    logits.append(ours.compute_logits(ours(ids[:, 5:8], positions[:, 5:8], cache)).view(2, 3, -1))
    cache.end()
    for t in range(8, 14):
        cache.begin(1)
        logits.append(ours.compute_logits(ours(ids[:, t:t + 1], positions[:, t:t + 1], cache)).view(2, 1, -1))
        cache.end()
    torch.testing.assert_close(torch.cat(logits, 1), ref, atol=1e-4, rtol=0)


def test_compute_logits_selects_rows(pair):
    _, _, ours = pair
    ids = prompts(2, 6)
    hidden = ours(ids, torch.arange(6).expand(2, 6), NoCache())
    full = ours.compute_logits(hidden)
    rows = torch.tensor([5, 11])  # the last token of each sequence in the flattened [B*T] rows
    assert ours.compute_logits(hidden, rows).shape == (2, ours.arch.vocab_size)
    torch.testing.assert_close(ours.compute_logits(hidden, rows), full[rows])
    assert full.dtype == torch.float32


def test_left_padding_gives_each_row_its_unpadded_logits(pair):
    name, _, ours = pair
    ids = prompts(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is a 5-token prompt, left-padded
    padded = ours.score(ids, mask)
    alone = ours.score(ids[1:, 4:])
    torch.testing.assert_close(padded[1, 4:], alone[0], atol=1e-4, rtol=0)


def test_flat_ragged_batch_through_a_custom_backend():
    """B = 1, T = tokens of two sequences: a backend that knows the sequence boundaries."""
    hf = make("qwen2")
    ours = from_module(hf)

    class TwoSequences:
        def __init__(self, lengths):
            self.seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

        def attend(self, layer, q, k, v, *, scale, window=None):
            n = q.shape[1]
            pos = torch.arange(n)
            keep = (self.seq[:, None] == self.seq[None, :]) & (pos[:, None] >= pos[None, :])
            groups = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
            att = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            att = att.masked_fill(~keep, float("-inf")).softmax(-1)
            return torch.einsum("bhqk,bkhd->bqhd", att, v)

    a, b = prompts(1, 5, seed=3)[0], prompts(1, 7, seed=4)[0]
    flat = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    hidden = ours(flat, positions, TwoSequences([5, 7]))
    last = ours.compute_logits(hidden, torch.tensor([4, 11]))
    with torch.no_grad():
        torch.testing.assert_close(last[0], hf(a[None]).logits[0, -1], atol=1e-4, rtol=0)
        torch.testing.assert_close(last[1], hf(b[None]).logits[0, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe", "gpt2"])
def test_save_pretrained_directory_loads(tmp_path, name):
    hf = make(name)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ids = prompts(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.score(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_bf16_load_matches_transformers_in_bf16(tmp_path):
    hf = make("llama")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids = prompts(1, 8)
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(ids).logits.float()
    assert (ours.score(ids) - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=2.0),
    dict(rope_type="dynamic", factor=2.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    dict(rope_type="longrope", short_factor=[1.0 + i / 16 for i in range(8)],
         long_factor=[2.0 + i / 8 for i in range(8)], original_max_position_embeddings=8),
])
def test_rope_scalings_match_transformers(rope):
    """Beyond the trained length (max_position_embeddings 16, 20 tokens) where the scalings act."""
    hf = make("llama", max_position_embeddings=16, num_attention_heads=4,
              rope_parameters=dict(rope, rope_theta=10000.0))
    ours = from_module(hf)
    ids = prompts(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours.score(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_missing_shard_is_named(tmp_path):
    make("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path)


def test_mismatched_shape_is_named_before_loading(tmp_path):
    make("llama").save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*\(128, 64\).*\(96, 64\)"):
        load_model(tmp_path)


def test_unsupported_model_type_is_named():
    from ds_core.errors import ConfigError
    from ds_infer.models import arch_from_hf

    with pytest.raises(ConfigError, match="model_type 'bert'.*supported: llama"):
        arch_from_hf({"model_type": "bert"})


def test_transposed_weight_storage_keeps_values_and_logits():
    """store_weights_transposed (what the CPU decoder does) changes only the strides of the dense
    linear weights: the state dict is bit-identical, a second call changes nothing, and the logits
    still match transformers within the module's tolerance (1-row products sum in another order)."""
    hf = make("llama")
    ours = from_module(hf)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    assert ours.store_weights_transposed() > 0
    w = ours.model.layers[0].self_attn.qkv_proj.weight
    assert w.stride() == (1, w.shape[0]) and not w.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    assert ours.store_weights_transposed() == 0
    ids = prompts(1, 5)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    got = ours.score(ids)[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_rows_kernel_linears_keep_values_and_logits():
    """use_rows_kernel (what the CPU decoder does when replace_with_kernel_inject=True and ds-ops is
    installed) turns each dense nn.Linear into a RowsLinear: same parameters and state dict, a second
    call changes nothing; logits of a decode-sized input match transformers within the module's
    tolerance (the kernel sums in another order), prefill-sized inputs and anything needing gradients
    run F.linear."""
    from ds_core.ops import get_op
    from ds_infer.models.layers import RowsLinear

    if get_op("decode_linear") is None:
        pytest.skip("ds-ops is not installed: the decoder stores the weights transposed instead")
    hf = make("llama")
    ours = from_module(hf)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    changed = ours.use_rows_kernel()
    assert changed > 0 and ours.use_rows_kernel() == changed  # idempotent: the same layers, already swapped
    layer = ours.model.layers[0].self_attn.qkv_proj
    assert type(layer) is RowsLinear and layer.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    for rows in (1, 5, 40):  # 40 > 16 rows: F.linear
        ids = prompts(1, rows)
        with torch.no_grad():
            ref = hf(ids).logits
        torch.testing.assert_close(ours.score(ids), ref, atol=1e-4, rtol=0)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()  # a product that needs gradients: F.linear, differentiable
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1))


def test_cpu_decoder_picks_the_rows_kernel_only_when_fused():
    import ds_infer
    from ds_core.ops import get_op
    from ds_infer.decode import Decoder
    from ds_infer.models.layers import RowsLinear

    fused = ds_infer.init_inference(make("llama"), replace_with_kernel_inject=True).decoder().model
    plain = from_module(make("llama"))  # native, norms not fused: the decoder keeps to PyTorch
    Decoder(plain)
    assert (RowsLinear in {type(m) for m in fused.modules()}) == (get_op("decode_linear") is not None)
    assert RowsLinear not in {type(m) for m in plain.modules()}
    w = plain.model.layers[0].mlp.down_proj.weight
    assert w.stride() == (1, w.shape[0])  # the BLAS layout instead (store_weights_transposed)
