"""Structured outputs: grammars compiled for the served tokenizer (xgrammar), and the token masks of constrained rows.

The interface, for any caller that wants a row's output to follow a grammar (response formats, tool calls):

- put a `params.Grammar` on the row's `SamplingParams`: `Grammar("json")` (any JSON object),
  `Grammar.of_schema(schema_dict, strict=True)`, `Grammar("regex", pattern)`, `Grammar("ebnf", text)` (root rule
  `root`), `Grammar("structural_tag", tag_json)` (xgrammar's structural tag: free text with constrained parts);
- check it before submitting, off the event loop: `ServedModel.check_grammar(grammar)` (`Grammars.compile`) raises
  `GrammarError` for one xgrammar cannot compile, and caches the compiled grammar in an LRU keyed by the `Grammar`
  itself (kind, source, strict). `Grammar.of_schema` writes a schema as compact JSON with its key order kept, since
  a schema's property order is the order the output writes them in;
- the engine gives each row of such a request its own matcher. After every forward pass (prefill or decode, graphed
  or not) `constrain` fills the bitmasks of the constrained rows only and applies them in place to those rows of the
  logits, with xgrammar's kernel for the logits' device; the row then samples from what is left (greedy rows: one
  batched argmax over the masked logits) and its matcher accepts the token. A row whose matcher has terminated (it
  took an end token where the grammar was complete: the mask allows end tokens only there) finishes with "stop";
  `max_tokens` still ends it with "length".
  Constrained rows read their logits on the host every step, so they never ride the chained greedy passes.

JSON is generated compact (no free whitespace), so a model cannot pad an answer with endless blanks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import torch
import xgrammar as xgr

from bentoservice.engine.errors import GrammarError
from bentoservice.engine.params import Grammar

CACHE_SIZE = 256
"""Compiled grammars kept per served model (a compiled JSON schema is tens of kilobytes)."""

Matcher = xgr.GrammarMatcher


class Constrained(Protocol):
    """What masking reads of a running sequence."""

    matcher: Matcher | None


def _reason(exc: Exception) -> str:
    """xgrammar's message without its `[time] file.cc:line:` prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip() or type(exc).__name__


class Grammars:
    """The compiler for one tokenizer, its cache, and the bitmask buffer of the running batch."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, end_ids: Collection[int], max_rows: int, cache_size: int = CACHE_SIZE
    ) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(end_ids))
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # the LRU below is the cache
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        self.compile = functools.lru_cache(maxsize=cache_size)(self._compile)

    def _compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        compiler = self._compiler
        try:
            if grammar.kind == "json":
                return compiler.compile_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
            if grammar.kind == "json_schema":
                return compiler.compile_json_schema(grammar.source, any_whitespace=False, strict_mode=grammar.strict)
            if grammar.kind == "regex":
                return compiler.compile_regex(grammar.source)
            if grammar.kind == "ebnf":
                return compiler.compile_grammar(grammar.source)
            return compiler.compile_structural_tag(grammar.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(_reason(exc)) from None

    def matcher(self, grammar: Grammar) -> Matcher:
        return xgr.GrammarMatcher(self.compile(grammar))

    def constrain(self, logits: torch.Tensor, rows: Sequence[Constrained]) -> bool:
        """Mask, in place, the logits of the rows with a live matcher to the tokens their grammar allows next;
        the other rows' logits are not touched. Whether any row was masked (an argmax taken before is then stale)."""
        indices = [i for i, row in enumerate(rows) if row.matcher is not None and not row.matcher.is_terminated()]
        if not indices:
            return False
        bitmask = self._bitmask[: len(rows)]
        for i in indices:
            matcher = rows[i].matcher
            assert matcher is not None
            matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size, indices=indices
        )
        return True
