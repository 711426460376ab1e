"""``ds_ops::paged_attention``: the Triton kernel (CPU tensors under TRITON_INTERPRET=1, and compiled on
CUDA) and the op's PyTorch default against dense causal attention per sequence.

Tolerances: fp32 1e-5 (same math, online vs. one-pass softmax); bf16 2e-2 against fp32 math on the
same bf16 values (the kernel rounds its output to bf16).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ds_ops import paged_attention as pa  # noqa: E402

FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)
# (context length, queries): a long prefill past one query tile, decode tokens, a chunk with earlier
# context, a one-token sequence, a chunk spanning block boundaries
CASES = [(37, 37), (50, 1), (20, 5), (1, 1), (33, 17)]


def _case(dtype, device="cpu", block_size=16, hq=4, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-ctx // block_size) for ctx, _ in CASES]
    num_blocks = sum(blocks_needed) + 4
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(CASES), max(blocks_needed), dtype=torch.int32)
    for s, n in enumerate(blocks_needed):
        tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    q_lens = torch.tensor([q for _, q in CASES])
    starts = torch.zeros(len(CASES) + 1, dtype=torch.int32)
    starts[1:] = q_lens.cumsum(0)
    seq_lens = torch.tensor([c for c, _ in CASES], dtype=torch.int32)
    q = torch.randn(int(starts[-1]), hq, d, generator=g).to(dtype)
    args = (q, k_cache, v_cache, tables, seq_lens, starts)
    return tuple(t.to(device) for t in args), int(q_lens.max())


def _dense(q, k_cache, v_cache, tables, seq_lens, starts, scale, window):
    """Contiguous keys per sequence, repeated kv heads, an explicit mask; fp32."""
    bs, groups = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = []
    for s, ctx in enumerate(seq_lens.tolist()):
        lo, hi = int(starts[s]), int(starts[s + 1])
        blocks = tables[s, : -(-ctx // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(groups, 1).transpose(0, 1)
        v = v_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(groups, 1).transpose(0, 1)
        diff = torch.arange(ctx - (hi - lo), ctx, device=q.device)[:, None] - torch.arange(ctx, device=q.device)[None]
        mask = (diff >= 0) & (diff < window) if window else diff >= 0
        o = F.scaled_dot_product_attention(q[lo:hi].float().transpose(0, 1)[None], k[None], v[None],
                                           attn_mask=mask, scale=scale)  # fmt: skip
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def kernel(triton_kernels):
    return triton_kernels("paged_attention")


@pytest.mark.parametrize("dtype,tol,window", [(torch.float32, FP32, 0), (torch.bfloat16, BF16, 7)])
def test_triton_kernel_matches_dense(kernel, dtype, tol, window):
    args, max_q = _case(dtype, hq=2, hkv=1, d=16)  # small: the interpreter runs every program in Python
    out = kernel.paged_attention_launch(*args, max_q, 0.2, window)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out.float(), _dense(*args, 0.2, window), **tol)


@pytest.mark.parametrize("window", [0, 7])
def test_default_matches_dense(window):
    args, max_q = _case(torch.float32, block_size=4, hq=6, hkv=3, d=8, seed=1)
    out = torch.ops.ds_ops.paged_attention(*args, max_q, 0.2, window)
    torch.testing.assert_close(out, _dense(*args, 0.2, window), **FP32)


def test_bad_shapes_name_the_rule():
    (q, k_cache, v_cache, tables, seq_lens, starts), max_q = _case(torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        torch.ops.ds_ops.paged_attention(q[:, :3], k_cache, v_cache, tables, seq_lens, starts, max_q, 0.2, 0)
    with pytest.raises(ValueError, match="query_start_loc"):
        torch.ops.ds_ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, starts[:-1], max_q, 0.2, 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16), (torch.float16, BF16)])
def test_compiled_kernel_on_cuda(dtype, tol):
    """The op dispatches to the compiled Triton kernel on CUDA tensors (block 16, head dim 128)."""
    args, max_q = _case(dtype, device="cuda", d=128)
    assert pa.kernel_supports(args[0], args[1], args[2])
    out = torch.ops.ds_ops.paged_attention(*args, max_q, 128**-0.5, 0)
    torch.testing.assert_close(out.float(), _dense(*args, 128**-0.5, 0), **tol)
