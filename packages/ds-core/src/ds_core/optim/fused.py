"""The fused-step contract between data-parallel strategies and optimizers.

An optimizer whose class lists ``"grad_scale"`` and ``"copy_to"`` in ``fused_step_args`` (ds-ops' CPU
optimizers do) is handed the gradient coefficient (unscale × clip) and the 16-bit model tensors to
write, and does both inside its one pass over memory; any other optimizer gets its gradients
multiplied first and the model tensors copied after, with the same numbers.
"""

from __future__ import annotations

import torch

__all__ = ["fuses", "copy_target"]


def fuses(optimizer, *args: str) -> bool:
    """True when ``optimizer.step`` takes every keyword in ``args`` (its class's ``fused_step_args``)."""
    return set(args) <= set(getattr(type(optimizer), "fused_step_args", ()))


def copy_target(model_tensor: torch.Tensor | None, master: torch.Tensor) -> torch.Tensor | None:
    """``model_tensor`` flattened when a fused step can write ``master``'s new values into it (bf16/fp16,
    contiguous, same device and size), else None (the caller copies after the step)."""
    ok = (model_tensor is not None and model_tensor.dtype in (torch.bfloat16, torch.float16)
          and model_tensor.is_contiguous() and model_tensor.device == master.device
          and model_tensor.numel() == master.numel())
    return model_tensor.data.view(-1) if ok else None
