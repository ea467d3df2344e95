"""Per-request sampling: greedy at temperature 0, top-p keeps only the nucleus, a seed repeats its samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bentoservice.engine.params import SamplingParams
from bentoservice.engine.sampling import make_generator, next_tokens, sample

LOGITS = torch.tensor([0.0, 3.0, 1.0, 2.9])


def test_temperature_zero_is_the_argmax() -> None:
    assert sample(LOGITS, SamplingParams(max_tokens=1, temperature=0), make_generator(0)) == 1


def test_top_p_samples_only_within_the_nucleus() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    generator = make_generator(0)
    drawn = {sample(LOGITS, params, generator) for _ in range(200)}
    assert drawn <= {1, 3} and len(drawn) == 2  # tokens 1 and 3 hold over half the mass; 0 and 2 never come


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)


def test_a_seed_repeats_its_samples_and_rows_do_not_share_rngs() -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0)
    logits = torch.zeros(3, 50)
    first = [next_tokens(logits[:1], [Row(params, make_generator(7))], ())[0][0] for _ in range(5)]
    assert len(set(first)) == 1  # a fresh generator with the same seed: the same token
    rows = [
        Row(SamplingParams(max_tokens=1, temperature=0), make_generator(None)),
        Row(params, make_generator(7)),
        Row(params, make_generator(7)),
    ]
    (greedy_row, seeded, same_seed), logprobs = next_tokens(logits + torch.arange(50.0), rows, ())
    assert greedy_row == 49 and seeded == same_seed and logprobs == [None, None, None]


def test_precomputed_greedy_tokens_are_used_as_given() -> None:
    rows = [Row(SamplingParams(max_tokens=1, temperature=0), make_generator(0))] * 2
    assert next_tokens(torch.zeros(2, 4), rows, (), greedy=[3, 2])[0] == [3, 2]
