"""Fused multi-tensor Adam/AdamW in Triton: one launch updates every tensor of a list.

The tensors of a parameter group live at unrelated addresses, so the kernel reads them through a
pointer table (one int64 row per tensor: param, grad, exp_avg, exp_avg_sq, model copy, numel) and a
chunk table (one row per program: tensor index, first element), the same layout as apex's
``multi_tensor_apply`` without its fixed-size argument struct. Each program updates ``CHUNK``
elements of one tensor in ``BLOCK``-wide steps.

Master weights and optimizer state are fp32; grads may be fp32/bf16/fp16 and are read in their own
dtype; when a model copy is given (bf16/fp16 params of the module), the updated fp32 weight is cast
and written to it in the same pass, so mixed-precision training needs no separate copy kernel.
The update is Algorithm 2 of Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW),
or Algorithm 1 of Kingma & Ba (Adam, L2 decay added to the grad), in the operation order of
``torch.optim.AdamW`` so results agree to float rounding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

__all__ = ["fused_adam_launch", "unsupported_reason", "CHUNK", "BLOCK"]

# Elements per program: 16384 gives 4096 programs for 67M parameters (about 31 per multiprocessor
# of an H200), enough independent loads in flight to approach the memory bandwidth; the chunk table
# stays at 2·8 bytes per 16384 elements (1 MB for 1e9 parameters).
CHUNK = 16384
BLOCK = 1024  # elements per vector step inside a program
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLE_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_TABLE_CACHE_SIZE = 16


@triton.jit
def _fused_adam_kernel(
    ptr_table,
    chunk_table,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    bias_correction2_sqrt,
    inv_grad_scale,
    GRAD_DTYPE: tl.constexpr,
    MODEL_DTYPE: tl.constexpr,
    ADAMW: tl.constexpr,
    WRITE_MODEL: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)
    row = ptr_table + 6 * t
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 5)
    end = tl.minimum(numel, start + CHUNK)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_grad_scale
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if ADAMW:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(grad, 1 - beta1)
        v = v * beta2 + (1.0 - beta2) * g * g
        # sqrt_rn/div_rn: IEEE rounding, as torch does; the default approximations drift by ulps.
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if WRITE_MODEL:
            w_ptr = tl.load(row + 4).to(tl.pointer_type(MODEL_DTYPE))
            tl.store(w_ptr + offs, p.to(MODEL_DTYPE), mask=mask)


def _tables(params, grads, exp_avgs, exp_avg_sqs, model_params, chunk):
    """Pointer and chunk tables, cached by address: the same group reuses them every step."""
    device = params[0].device
    rows = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        w = model_params[i].data_ptr() if model_params else 0
        rows.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w, p.numel()))
    key = (device, chunk, tuple(rows))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    chunks = [(t, s) for t, row in enumerate(rows) for s in range(0, row[5], chunk)]
    ptr_table = torch.tensor(rows, dtype=torch.int64).to(device)
    chunk_table = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 2).to(device)
    _TABLE_CACHE[key] = (ptr_table, chunk_table)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return ptr_table, chunk_table


def unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, model_params) -> str | None:
    """Why one launch cannot take these lists (the op then runs its default), or None."""
    for name, tensors in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        for i, t in enumerate(tensors):
            if t.dtype != torch.float32 or not t.is_contiguous():
                return (
                    f"{name}[{i}] is {'' if t.is_contiguous() else 'non-contiguous '}{t.dtype}; master "
                    "weights and optimizer state must be contiguous float32"
                )
    for name, tensors in (("grads", grads), ("model_params", model_params)):
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1 or not dtypes <= set(_TL_DTYPES) or not all(t.is_contiguous() for t in tensors):
            return (
                f"{name} have dtypes {sorted(map(str, dtypes))}; one launch needs contiguous tensors "
                "of a single dtype among float32/bfloat16/float16 (group them by dtype)"
            )
    return None


def fused_adam_launch(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    model_params: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool = True,
    bias_correction: bool = True,
    grad_scale: float = 1.0,
    chunk: int = CHUNK,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> None:
    """Update ``params``/``exp_avgs``/``exp_avg_sqs`` (and ``model_params`` if given) in one launch."""
    if not params:
        return
    reason = unsupported_reason(params, grads, exp_avgs, exp_avg_sqs, model_params)
    if reason is not None:
        raise ValueError(f"fused_adam Triton kernel: {reason}")
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    ptr_table, chunk_table = _tables(params, grads, exp_avgs, exp_avg_sqs, model_params, chunk)
    model_dtype = _TL_DTYPES[model_params[0].dtype] if model_params else tl.float32
    _fused_adam_kernel[(chunk_table.shape[0],)](
        ptr_table,
        chunk_table,
        float(lr),  # floats, so Triton never specializes a value like 1 or 0 into an int constexpr
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        lr / bc1,
        bc2**0.5,
        1.0 / grad_scale,
        _TL_DTYPES[grads[0].dtype],
        model_dtype,
        bool(adamw),
        bool(model_params),
        CHUNK=chunk,
        BLOCK=block,
        num_warps=num_warps,
    )
