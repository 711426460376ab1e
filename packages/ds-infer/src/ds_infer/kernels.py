"""Which kernel runs each fused op: a ds-ops kernel through the op registry, or PyTorch's own.

The native models call :func:`rms_norm` and :func:`layer_norm` here. With ``fused=True`` (the
norm modules' flag, set by ``replace_with_kernel_inject=True``) and a tensor on a device for which a ds-ops kernel exists
(Triton on CUDA), the op registry's ``ds_ops::rms_norm_fwd`` / ``layer_norm_fwd`` run. Otherwise
PyTorch's fused ``F.rms_norm`` / ``F.layer_norm`` run: on CPU they are already single C++ kernels,
while the registry's CPU entry is the pure-PyTorch reference — slower, so it is never picked there.

RMSNorm follows transformers' arithmetic (normalise in fp32, cast, then scale by the weight in the
input dtype) so fp32 logits match to the last bits and bf16 ones round the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ds_core.ops import get_op

__all__ = ["rms_norm", "layer_norm", "registry_op", "KERNEL_DEVICES"]

KERNEL_DEVICES = ("cuda",)  # devices where ds-ops registers a real (non-reference) norm kernel


def registry_op(name: str, device: torch.device, fused: bool = True):
    """``torch.ops.ds_ops.<name>`` when ``fused`` and a kernel exists for ``device``, else None."""
    if not fused or device.type not in KERNEL_DEVICES:
        return None
    return get_op(name, None)


def rms_norm(x: Tensor, weight: Tensor, eps: float, fused: bool = False) -> Tensor:
    op = registry_op("rms_norm_fwd", x.device, fused)
    if op is not None:
        return op(x, [x.shape[-1]], weight, eps)[0]
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, fused: bool = False) -> Tensor:
    op = registry_op("layer_norm_fwd", x.device, fused)
    if op is not None:
        return op(x, [x.shape[-1]], weight, bias, eps)[0]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
