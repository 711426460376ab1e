"""``ds_ops::decode_linear``: ``F.linear`` for a decode step's few rows, its CPU kernel registered with
the dispatcher from C++.

Reference: the product in float64. Tolerance: the kernel sums each output in another order than the
BLAS (eight partial sums along K, then the tail), so fp32 results differ by float rounding:
1e-5 relative plus 1e-5·sqrt(K) absolute for unit-normal inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def op():
    from ds_core.ops import get_op

    op = get_op("decode_linear")
    assert op is not None
    op(torch.randn(1, 8), torch.randn(4, 8), None)  # builds and registers the C++ kernel
    return op


def reference(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def close(y, ref, k):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5)


def test_the_cpu_kernel_is_the_dispatchers_own(op):
    """After the first call the CPU key holds the C++ kernel: calls no longer pass through Python."""
    cpu = [line for line in torch._C._dispatch_dump("ds_ops::decode_linear").splitlines() if line.startswith("CPU:")]
    assert len(cpu) == 1 and "csrc/gemv.cpp" in cpu[0], cpu


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16])
@pytest.mark.parametrize("k,n", [(1, 3), (7, 5), (40, 17), (512, 64), (1024, 40), (1537, 9)])
def test_matches_the_product_for_every_row_count_and_tail(op, rows, k, n):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    close(op(x, w, None), reference(x, w, None), k)
    close(op(x, w, b), reference(x, w, b), k)


def test_two_threads_split_the_weight_rows_anywhere(op):
    """The intra-op pool hands each thread a range of weight rows that may start or end on an odd
    row: the two-row blocks (4+ tokens, K >= 1024) then finish with a single-row one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(7)
        for rows, n in ((8, 37), (5, 38), (16, 33)):
            x, w = torch.randn(rows, 1024, generator=g), torch.randn(n, 1024, generator=g)
            close(op(x, w, None), reference(x, w, None), 1024)
    finally:
        torch.set_num_threads(before)


def test_leading_dims_and_strided_activations(op):
    w, b = torch.randn(24, 96), torch.randn(24)
    x = torch.randn(2, 3, 96)
    y = op(x, w, b)
    assert y.shape == (2, 3, 24)
    close(y, reference(x, w, b), 96)
    xt = torch.randn(96, 4).t()  # [4, 96], not contiguous
    close(op(xt, w, b), reference(xt, w, b), 96)


def test_what_the_kernel_does_not_take_runs_f_linear(op):
    """More than 16 rows, a strided weight, other dtypes and empty inputs: F.linear's own result."""
    w, b = torch.randn(32, 64), torch.randn(32)
    x = torch.randn(17, 64)
    torch.testing.assert_close(op(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    wt = torch.randn(64, 32).t()
    x4 = torch.randn(4, 64)
    torch.testing.assert_close(op(x4, wt, None), F.linear(x4, wt), rtol=0, atol=0)
    xb, wb = x4.bfloat16(), w.bfloat16()
    torch.testing.assert_close(op(xb, wb, None), F.linear(xb, wb), rtol=0, atol=0)
    assert op(torch.randn(0, 64), w, b).shape == (0, 32)


def test_bad_shapes_name_both(op):
    with pytest.raises(ValueError, match=r"x \[2, 3\] and weight \[4, 5\] do not fit"):
        op(torch.randn(2, 3), torch.randn(4, 5), None)
    with pytest.raises(ValueError, match=r"bias \[3\] must be \[4\]"):
        op(torch.randn(2, 5), torch.randn(4, 5), torch.randn(3))


def test_compiled_graph_calls_it(op):
    """Under torch.compile the op is opaque (its fake gives the shape) and the graph calls the kernel."""
    w, b = torch.randn(48, 64), torch.randn(48)

    def step(x):
        return torch.relu(op(x, w, b)) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        close(compiled(x), torch.relu(reference(x, w, b)) * 2, 64)
