"""A padding-free batch split into passes of whole examples, each with its count of labelled positions."""

from __future__ import annotations

import torch
from conftest import packed_batch

from bentoservice.training.data.labels import IGNORE
from bentoservice.training.speed.passes import LABELLED, split_passes, with_labelled_counts


def test_a_batch_splits_into_passes_of_whole_examples() -> None:
    examples = [list(range(1, n + 1)) for n in (10, 25, 3, 50, 7)]
    batch = packed_batch(examples)
    passes = split_passes(batch, tokens=30)
    # In order, at most 30 tokens a pass: [10], [25, 3], [50] (longer than 30, alone), [7].
    assert [p["cu_seq_lens_q"].tolist() for p in passes] == [[0, 10], [0, 25, 28], [0, 50], [0, 7]]
    assert [p["max_length_q"] for p in passes] == [10, 25, 50, 7]
    for key in ("input_ids", "labels", "position_ids"):
        torch.testing.assert_close(torch.cat([p[key] for p in passes], dim=1), batch[key])
    assert split_passes(batch, tokens=95) == [batch]


def test_passes_are_as_few_and_as_even_as_fit() -> None:
    # 60 tokens in at most 40 a pass is 30 + 30, not 40 + 20.
    even = split_passes(packed_batch([list(range(1, 11))] * 6), tokens=40)
    assert [p["input_ids"].shape[1] for p in even] == [30, 30]
    # Passes padded to multiples of 16 tokens (graphed buckets): the cut that pads least, 16 + 24 (48 tokens once
    # padded) rather than 23 + 17 (64).
    odd = packed_batch([list(range(1, n + 1)) for n in (7, 9, 7, 9, 8)])
    assert [p["input_ids"].shape[1] for p in split_passes(odd, tokens=32)] == [23, 17]
    assert [p["input_ids"].shape[1] for p in split_passes(odd, tokens=32, granularity=16)] == [16, 24]


def test_each_pass_counts_the_positions_that_predict_a_labelled_token() -> None:
    batch = packed_batch([[1, 2, 3, 4], [5, 6, 7]])
    batch["labels"][0, :2] = IGNORE  # the first example's prompt
    passes = with_labelled_counts(batch, split_passes(batch, tokens=4))
    # Position i predicts label i + 1 within its pass: the first pass's labelled targets are 3 and 4, the second's
    # 6 and 7 (an example's first token is predicted by no position of its own).
    assert [p[LABELLED] for p in passes] == [2, 2]
