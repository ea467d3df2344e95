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


def next_tokens(logits: torch.Tensor, rows: list[tuple[SamplingParams, torch.Generator]],
                greedy: list[int] | None = None) -> list[int]:
    """One token per row of `logits`: the argmax where temperature is 0 (one batched op, or `greedy`
    when already computed), else a sample from the row's own RNG."""
    ids = logits.argmax(-1).tolist() if greedy is None else list(greedy)
    for i, (params, generator) in enumerate(rows):
        if params.temperature > 0:
            ids[i] = sample(logits[i].float().cpu(), params, generator)
    return ids
