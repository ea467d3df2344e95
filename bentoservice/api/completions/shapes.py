"""How chat and text completions differ on the wire: ids, objects, the choice's text and log-probabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bentoservice.engine.params import TokenLogprob
    from bentoservice.engine.served import ServedModel


def chat_logprobs(served: ServedModel, entries: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = served.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }


def text_logprobs(served: ServedModel, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [served.token_text(e.token) for e in entries]
    offsets = [offset + n for n in accumulate((len(t) for t in tokens[:-1]), initial=0)] if tokens else []
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "text_offset": offsets,
        "top_logprobs": [{served.token_text(t): lp for t, lp in e.top} for e in entries],
    }


@dataclass(frozen=True)
class Shape:
    """How chat and text completions differ on the wire."""

    id_prefix: str
    object: str
    chunk_object: str
    text_part: Callable[[str | None], dict[str, Any]]
    """The choice's text: in full, or (None) the empty delta of the last chunk."""
    full_part: Callable[[str], dict[str, Any]]
    logprobs: Callable[[ServedModel, list[TokenLogprob], int], dict[str, Any]]
    first_delta: dict[str, Any] | None = None


CHAT = Shape(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    lambda text: {"delta": {} if text is None else {"content": text}},
    lambda text: {"message": {"role": "assistant", "content": text, "refusal": None}},
    lambda served, entries, _: chat_logprobs(served, entries),
    {"delta": {"role": "assistant", "content": ""}},
)
TEXT = Shape(
    "cmpl",
    "text_completion",
    "text_completion",
    lambda text: {"text": text or ""},
    lambda text: {"text": text},
    text_logprobs,
)
