"""A request body as the engine's sampling parameters: the sampling fields, n, and the grammar of structured outputs."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from bentoservice.api.completions.structured import grammar_of
from bentoservice.api.errors import APIError
from bentoservice.engine.params import SamplingParams

if TYPE_CHECKING:
    from bentoservice.api.completions.protocol import ChatCompletionRequest, CompletionRequest
    from bentoservice.engine.served import ServedModel


async def request_params(
    body: ChatCompletionRequest | CompletionRequest, served: ServedModel, max_tokens: int
) -> SamplingParams:
    """The engine's parameters for a request's choices (the grammar compiled, see structured.py)."""
    for param, ids in (("logit_bias", body.logit_bias or {}), ("stop_token_ids", body.stop_token_ids or ())):
        if any(not 0 <= i < served.vocab_size for i in ids):
            raise APIError(
                400,
                f"{param} names a token id outside the vocabulary (0..{served.vocab_size - 1})",
                param,
                "invalid_value",
            )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stops,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.top_alternatives,
        grammar=await grammar_of(body, served),
    )


def choices_of(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n completions; with a seed, choice i samples from seed + i (distinct, and repeatable)."""
    if params.seed is None or n == 1:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]
