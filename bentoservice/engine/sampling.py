"""Per-request sampling: greedy at temperature 0, else temperature + top-p with the request's own RNG."""

from __future__ import annotations

import torch

from bentoservice.engine.params import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own RNG, so its samples do not depend on what else is in the batch."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a row of logits (float32, on the CPU)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
