"""Feeding sequence parallelism: each rank's slice of a batch (one process, shards built offline with
``TensorGroup(size, rank)``), and the bad input refused before any collective."""

import pytest
import torch

from ds_core.errors import ConfigError
from ds_parallel import TensorGroup, sequence_parallel_loss, shard_batch


def test_labels_are_shifted_before_the_sequence_is_cut():
    ids = torch.arange(8).view(1, 8)
    batch = {"input_ids": ids, "labels": ids.clone()}
    first = shard_batch(batch, TensorGroup(2, 0))
    second = shard_batch(batch, TensorGroup(2, 1))
    assert first["input_ids"].tolist() == [[0, 1, 2, 3]] and second["input_ids"].tolist() == [[4, 5, 6, 7]]
    # position 3's label is token 4, which lives on the other rank: kept
    assert first["shift_labels"].tolist() == [[1, 2, 3, 4]] and second["shift_labels"].tolist() == [[5, 6, 7, -100]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3]] and second["position_ids"].tolist() == [[4, 5, 6, 7]]
    assert torch.equal(first["labels"], first["shift_labels"])


def test_right_padding_becomes_ignored_labels():
    ids = torch.arange(8).view(1, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    second = shard_batch({"input_ids": ids, "labels": ids, "attention_mask": mask}, TensorGroup(2, 1))
    assert "attention_mask" not in second
    assert second["shift_labels"].tolist() == [[5, 6, -100, -100]]


def test_sequence_length_not_divisible_is_an_error_naming_the_numbers():
    with pytest.raises(ConfigError, match="sequence length 10 is not divisible by sequence_parallel_size 4; pad"):
        shard_batch({"input_ids": torch.zeros(2, 10, dtype=torch.long)}, TensorGroup(4, 0))


def test_left_padding_is_refused():
    mask = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ConfigError, match="left padding"):
        shard_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": mask}, TensorGroup(2, 0))


def test_loss_over_one_rank_is_the_mean():
    loss = sequence_parallel_loss(torch.tensor(6.0), torch.tensor(3), TensorGroup())
    assert loss.item() == 2.0
