"""Feeding a sequence-parallel model: each rank gets its slice of every sequence.

ALST's recipe (Bekman et al. 2025, "Arctic Long Sequence Training"): the labels are shifted *before*
the sequence is cut, so the label of a shard's last token (the next shard's first token) is not
lost at the border; ``position_ids`` carry the global positions, so rotary embeddings and causal
attention see where each slice sits; the loss is then a sum over each rank's tokens divided by the
valid tokens of the whole sequence group (:func:`sequence_parallel_loss`).

Everything here is checked before any collective: a sequence length that the sequence-parallel size
does not divide, or a padding mask that is not right-padding, raises on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ds_core import comm
from ds_core.errors import ConfigError

from ..comm import TensorGroup

__all__ = ["shard_batch", "SequenceShardedLoader", "sequence_parallel_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100
SEQUENCE_KEYS = ("input_ids", "shift_labels", "position_ids", "inputs_embeds", "token_type_ids")


def _check_right_padded(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ConfigError(f"attention_mask of shape {tuple(mask.shape)}: sequence parallelism takes a 2-D padding "
                          f"mask or none (attention is causal over the whole sequence)")
    m = mask.to(torch.int)
    if (m[:, 1:] > m[:, :-1]).any():
        raise ConfigError("attention_mask has padding before real tokens (left padding); sequence parallelism "
                          "computes causal attention over the whole sequence and supports right padding only "
                          "(pad at the end, with labels -100 there)")


def shard_batch(batch: Mapping, group=None, *, ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's slice of ``batch`` (``input_ids``, optional ``labels``, ``position_ids``,
    ``attention_mask``; other entries pass through unchanged).

    ``labels`` are shifted over the whole sequence first (``shift_labels``, what the next token is);
    the result carries ``labels`` and ``shift_labels`` (both this slice's shifted labels; Hugging Face
    models use ``shift_labels`` when given) and ``position_ids`` (global positions). A right-padding
    ``attention_mask`` is dropped (its positions carry label ``-100``); left padding is refused.
    """
    tg = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
    if "input_ids" in batch:
        ids = batch["input_ids"]
    elif "inputs_embeds" in batch:
        ids = batch["inputs_embeds"][..., 0]
    else:
        raise ConfigError(f"batch has neither input_ids nor inputs_embeds (keys: {', '.join(batch)})")
    b, s = ids.shape[:2]
    p, r = tg.size, tg.rank
    if s % p:
        raise ConfigError(f"sequence length {s} is not divisible by sequence_parallel_size {p}; pad the batch to a "
                          f"multiple of {p} (e.g. pad_to_multiple_of={p} in the collator, labels -100 on padding)")
    out = dict(batch)
    labels = out.pop("labels", None)
    shift = out.pop("shift_labels", None)
    if shift is None and labels is not None:
        shift = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    mask = out.pop("attention_mask", None)
    if mask is not None:
        _check_right_padded(mask)
        if shift is not None:
            shift = shift.masked_fill(mask == 0, ignore_index)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(s, device=ids.device).unsqueeze(0).expand(b, s)
    if shift is not None:
        out["shift_labels"] = shift
    chunk = s // p
    for key in SEQUENCE_KEYS:
        if key in out and isinstance(out[key], torch.Tensor):
            out[key] = out[key][:, r * chunk:(r + 1) * chunk].contiguous()
    if shift is not None:
        out["labels"] = out["shift_labels"]
    return out


class SequenceShardedLoader:
    """Wrap a dataloader (or any iterable of batch dicts) so each sequence-parallel rank gets its slice.

    Every rank of a sequence group must read the same batches (the engine's dataloader already gives
    ranks of one data-parallel coordinate the same samples).
    """

    def __init__(self, loader: Iterable, group=None, ignore_index: int = IGNORE_INDEX) -> None:
        self.loader = loader
        self.group = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
        self.ignore_index = ignore_index

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield shard_batch(batch, self.group, ignore_index=self.ignore_index)

    def __len__(self) -> int:
        return len(self.loader)


def sequence_parallel_loss(loss_sum: torch.Tensor, valid: torch.Tensor, group=None,
                           num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The mean loss over every valid token of the sequence group, from this rank's sum and count.

    Returns a tensor whose value is the group's mean (the same on every rank, so logs show the real
    loss) and whose gradient is this rank's ``loss_sum / total``: summing the ranks' parameter
    gradients (the sequence group's gradient all-reduce) gives the gradient of the mean.
    ``num_items`` replaces the count (a count over several micro-batches, as Hugging Face passes).
    """
    tg = group if isinstance(group, TensorGroup) else TensorGroup.of(group)
    if tg.size == 1:
        divisor = num_items if num_items is not None else valid
        return loss_sum / divisor
    tg.require_live("the sequence-parallel loss")
    stats = torch.stack([loss_sum.detach().float(), valid.detach().float().to(loss_sum.device)])
    comm.all_reduce(stats, group=tg.group)
    total = stats[1] if num_items is None else torch.as_tensor(num_items, dtype=torch.float32,
                                                               device=loss_sum.device)
    # value: the group's sum; gradient: this rank's sum
    summed = loss_sum + (stats[0] - loss_sum.detach())
    return summed / total.clamp(min=1)
