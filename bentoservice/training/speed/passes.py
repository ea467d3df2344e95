"""A padding-free batch split into passes of whole examples, each with the count of its labelled positions."""

from __future__ import annotations

import itertools
from typing import Any

from bentoservice.training.data.labels import IGNORE

# The key under which a training pass carries how many of its positions predict a labelled token (a number the host
# knows, so that the loss needs nothing read back from the GPU).
LABELLED = "bentoservice_labelled"


def with_labelled_counts(inputs: dict[str, Any], passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `passes` of the padding-free batch `inputs` (consecutive parts of its row), each with how many of its
    positions predict a labelled token (under LABELLED), read back from the device at once."""
    labelled = (inputs["labels"][0] != IGNORE).cpu()
    counted, start = [], 0
    for part in passes:
        end = start + part["labels"].shape[1]
        counted.append({**part, LABELLED: int(labelled[start + 1 : end].sum())})
        start = end
    return counted


def split_passes(inputs: dict[str, Any], tokens: int, granularity: int = 1) -> list[dict[str, Any]]:
    """A padding-free batch (one row; TRL's `cu_seq_lens_q` marks where each example starts) as consecutive passes of
    whole examples (`_cuts`: as few as hold at most `tokens` tokens each, unless one example alone is longer, padded
    to multiples of `granularity`)."""
    bounds = inputs["cu_seq_lens_q"].tolist()
    if bounds[-1] <= tokens or len(bounds) <= 2:
        return [inputs]
    cuts = _cuts(bounds, tokens, granularity)
    row = inputs["input_ids"].shape[1]
    passes = []
    for first, last in itertools.pairwise(cuts):
        start, end = bounds[first], bounds[last]
        part = {
            key: value[:, start:end] if getattr(value, "ndim", 0) == 2 and value.shape[1] == row else value
            for key, value in inputs.items()
        }
        cu = inputs["cu_seq_lens_q"][first : last + 1] - start
        longest = max(b - a for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1], strict=False))
        part.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if "seq_idx" in part:
            part["seq_idx"] = part["seq_idx"] - first
        passes.append(part)
    return passes


def _cuts(bounds: list[int], tokens: int, granularity: int) -> list[int]:
    """Example indices that cut `bounds` (example starts, then the end) into passes of at most `tokens` tokens (an
    example longer than that alone): the fewest passes; of those, the fewest tokens once each pass is padded up to a
    multiple of `granularity` (a graphed pass runs in the bucket that holds it); then the smallest largest pass."""
    # best[j]: (passes, padded tokens, largest pass, where the last pass starts) for the first j examples.
    best: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    for j in range(1, len(bounds)):
        options = []
        for i in range(j - 1, -1, -1):
            size = bounds[j] - bounds[i]
            if size > tokens and i < j - 1:
                break
            passes, padded, largest, _ = best[i]
            options.append((passes + 1, padded + -(-size // granularity) * granularity, max(largest, size), i))
        best.append(min(options))
    cuts = [len(bounds) - 1]
    while cuts[-1]:
        cuts.append(best[cuts[-1]][3])
    return cuts[::-1]
