"""Per-request sampling: greedy at temperature 0, else temperature + top-p with the request's own RNG.

Rows that ask for penalties, a logit bias, a minimum length or log-probabilities get their own logits
adjusted on the device where the pass left them; the other rows keep the batched argmax. A row under a grammar
has had its logits masked in place (grammar.py) before it gets here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import torch

from bentoservice.engine.params import SamplingParams, TokenLogprob


class Row(Protocol):
    """What sampling reads of a running sequence."""

    prompt: list[int]
    generated: list[int]
    params: SamplingParams
    generator: torch.Generator


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


def adjust(logits: torch.Tensor, row: Row, end_ids: Collection[int]) -> torch.Tensor:
    """A row's logits after its penalties (OpenAI's presence/frequency over the generated tokens, the
    HF/vLLM repetition penalty over prompt and generated), its logit bias, and its end tokens banned
    until `min_tokens` are out."""
    params = row.params
    logits = logits.clone()
    device = logits.device
    if row.generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(row.generated, device=device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt) | set(row.generated)), device=device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=False)
        logits[torch.tensor(ids, device=device)] += torch.tensor(biases, dtype=logits.dtype, device=device)
    if len(row.generated) < params.min_tokens:
        logits[torch.tensor(sorted(set(end_ids) | set(params.stop_token_ids)), device=device)] = float("-inf")
    return logits


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=False))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def next_tokens(
    logits: torch.Tensor, rows: Sequence[Row], end_ids: Collection[int], greedy: list[int] | None = None
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits`: the argmax where temperature is 0 (one batched op, or `greedy`
    when already computed from these very logits: not when some rows were masked since), else a sample
    from the row's own RNG; and the log-probabilities of the rows that asked for them (of the adjusted
    logits, before temperature and top-p)."""
    ids = logits.argmax(-1).tolist() if greedy is None else list(greedy)
    logprobs: list[TokenLogprob | None] = [None] * len(ids)
    for i, row in enumerate(rows):
        params = row.params
        if not (params.adjusts or params.logprobs is not None or params.temperature > 0):
            continue
        own = adjust(logits[i], row, end_ids) if params.adjusts else logits[i]
        if params.temperature > 0:
            ids[i] = sample(own.float().cpu(), params, row.generator)
        elif params.adjusts:
            ids[i] = int(own.argmax())
        if params.logprobs is not None:
            logprobs[i] = token_logprob(own, ids[i], params.logprobs)
    return ids, logprobs
