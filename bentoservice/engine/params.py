"""Request parameters and events shared by the engine and its callers (no torch here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json", "json_schema", "regex", "ebnf", "structural_tag"]


@dataclass(frozen=True)
class Grammar:
    """What a constrained row's output must match (compiled once per tokenizer by engine/grammar.py).

    `json`: any JSON object (`source` unused); `json_schema`: `source` is the schema as compact JSON (`strict`:
    no properties beyond those the schema names, unless it says otherwise); `regex`; `ebnf` (root rule `root`);
    `structural_tag`: xgrammar's structural tag as JSON (free text with constrained segments, e.g. tool calls).
    """

    kind: GrammarKind
    source: str = ""
    strict: bool = True

    @classmethod
    def of_schema(cls, schema: dict[str, Any], strict: bool = True) -> Grammar:
        """A JSON schema's grammar; the source keeps the schema's key order (the order the output writes them in)."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), strict)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many of the most likely alternatives."""
    grammar: Grammar | None = None
    """The output must match it: the row's logits are masked to the tokens it allows, and it ends when complete."""

    @property
    def adjusts(self) -> bool:
        """Whether a row's logits change before it samples (rows that do not stay on the fast path)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    @property
    def per_row(self) -> bool:
        """Whether this row needs its logits read on the host every step (no chained greedy passes)."""
        return self.adjusts or self.logprobs is not None or self.grammar is not None


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()

    def then(self, following: Delta) -> Delta:
        return Delta(self.text + following.text, self.logprobs + following.logprobs)


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500
    code: str = "generation_failed"


Event = Delta | Finished | Failed
