"""Knowledge-distillation helpers.

- :func:`logits_kd_loss`: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens (Hinton et al.
  2015), the prediction-layer loss of TinyBERT, XTC and layer reduction.
- :func:`hidden_mse_loss`: mean squared error between chosen student and teacher hidden states
  (TinyBERT's intermediate-layer loss), with a student -> teacher layer map.
- :func:`capture_block_inputs` and :func:`layerwise_distill`: layer-by-layer distillation (LKD, from
  ZeroQuant, Yao et al. 2022): each student block is trained on its own to reproduce the teacher
  block's output from the teacher's input to that block, so no full-model backward is needed.
- :func:`model_output_logits` and :func:`run_batch`: how a batch is fed (tensor, tuple, dict) and
  where the logits are (a tensor, a tuple's first item, or ``.logits``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CompressionError

__all__ = [
    "logits_kd_loss",
    "hidden_mse_loss",
    "run_batch",
    "model_output_logits",
    "find_blocks",
    "capture_block_inputs",
    "block_hidden",
    "layerwise_distill",
]


def logits_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-target distillation loss, per token, averaged."""
    if student_logits.shape != teacher_logits.shape:
        raise CompressionError(f"logits_kd_loss: student logits {tuple(student_logits.shape)} and teacher "
                               f"logits {tuple(teacher_logits.shape)} differ in shape; distill models with "
                               f"the same vocabulary on the same batch")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
                    layer_map: Sequence[int] | None = None) -> Tensor:
    """Mean over student layers ``i`` of ``MSE(student_hidden[i], teacher_hidden[layer_map[i]])``."""
    layer_map = list(layer_map) if layer_map is not None else list(range(len(student_hidden)))
    if len(layer_map) != len(student_hidden):
        raise CompressionError(f"hidden_mse_loss: layer_map has {len(layer_map)} entries for "
                               f"{len(student_hidden)} student layers; give one teacher index per student layer")
    for t in layer_map:
        if not 0 <= t < len(teacher_hidden):
            raise CompressionError(f"hidden_mse_loss: teacher layer {t} is out of range: the teacher "
                                   f"has {len(teacher_hidden)} hidden states (0..{len(teacher_hidden) - 1})")
    losses = [F.mse_loss(s.float(), teacher_hidden[t].detach().float()) for s, t in zip(student_hidden, layer_map)]
    return torch.stack(losses).mean()


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` by the batch's type."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_output_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise CompressionError(f"cannot find logits in a model output of type {type(out).__name__}; return a "
                           f"tensor, a tuple starting with the logits, or an object with .logits")


def find_blocks(model: nn.Module, contains: type = nn.Linear) -> tuple[str, nn.ModuleList] | None:
    """The repeated transformer blocks: the ``nn.ModuleList`` with the most ``contains`` modules."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            count = sum(isinstance(x, contains) for x in m.modules())
            if count and (best is None or count > best[0]):
                best = (count, name, m)
    return (best[1], best[2]) if best else None


class _Stop(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any]) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` ``block`` is called with, for each batch (the model stops there)."""
    seen: list[tuple[tuple, dict]] = []

    def grab(_module, args, kwargs):
        seen.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not seen:
        raise CompressionError("calibration: no batch reached the model's blocks; pass a non-empty "
                               "list of batches the model accepts")
    return seen


def block_hidden(out: Any) -> Tensor:
    """A block's output hidden states (the tensor, or the first item of a tuple)."""
    return out if isinstance(out, Tensor) else out[0]


def _next_inputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    with torch.no_grad():
        return [((block_hidden(block(*a, **k)),) + tuple(a[1:]), k) for a, k in inputs]


def layerwise_distill(student_blocks: Sequence[nn.Module], teacher_blocks: Sequence[nn.Module],
                      inputs: list[tuple[tuple, dict]], steps: int = 50, lr: float = 1e-4) -> list[float]:
    """LKD: train each student block to match its teacher block on the teacher's inputs.

    ``inputs`` are the ``(args, kwargs)`` of the first block (:func:`capture_block_inputs`); the
    inputs of block ``k + 1`` are the teacher's block-``k`` outputs. Returns the last loss per block.
    """
    if len(student_blocks) != len(teacher_blocks):
        raise CompressionError(f"layerwise_distill: {len(student_blocks)} student blocks but "
                               f"{len(teacher_blocks)} teacher blocks; LKD pairs them one to one")
    losses = []
    for student, teacher in zip(student_blocks, teacher_blocks):
        with torch.no_grad():
            targets = [block_hidden(teacher(*a, **k)) for a, k in inputs]
        params = [p for p in student.parameters() if p.requires_grad]
        if params and steps > 0:
            opt = torch.optim.Adam(params, lr=lr)
            for step in range(steps):
                a, k = inputs[step % len(inputs)]
                loss = F.mse_loss(block_hidden(student(*a, **k)).float(), targets[step % len(inputs)].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
        inputs = _next_inputs(teacher, inputs)
    return losses
