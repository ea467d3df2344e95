"""Grammars for the served tokenizer (SmolLM2's): compiled once and cached, errors that say why, and masks applied
only to the constrained rows of a batch, before the row's token is chosen; the grammar of a forced tool call."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoTokenizer

from bentoservice import store
from bentoservice.engine.errors import GrammarError
from bentoservice.engine.grammar import Grammars, Matcher
from bentoservice.engine.params import Grammar, SamplingParams
from bentoservice.engine.sampling import make_generator, next_tokens
from bentoservice.engine.tool_parsers import HermesFormat

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="module")
def tokenizer(smollm2: store.StoredModel):
    return AutoTokenizer.from_pretrained(smollm2.path)


@pytest.fixture
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, max_rows=4, cache_size=2)


@dataclass
class Row:
    params: SamplingParams
    matcher: Matcher | None = None
    generator: torch.Generator = field(default_factory=lambda: make_generator(0))
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)


def test_a_schema_is_compiled_once_and_the_cache_is_bounded(grammars: Grammars) -> None:
    first = grammars.compile(Grammar.of_schema(SCHEMA))
    assert grammars.compile(Grammar.of_schema(dict(SCHEMA))) is first  # an equal schema: the same compiled grammar
    assert grammars.compile.cache_info().misses == 1 and grammars.compile.cache_info().hits == 1
    grammars.compile(Grammar("regex", "a+"))
    grammars.compile(Grammar("json"))  # a third grammar evicts the least recently used (the schema)
    assert grammars.compile(Grammar.of_schema(SCHEMA)) is not first
    assert grammars.compile.cache_info().currsize == 2


def test_the_source_keeps_the_schemas_key_order() -> None:
    reordered = {"required": ["ok"], "properties": SCHEMA["properties"], "type": "object"}
    assert (
        Grammar.of_schema(SCHEMA).source == '{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"]}'
    )
    assert Grammar.of_schema(reordered) != Grammar.of_schema(SCHEMA)


@pytest.mark.parametrize(
    "grammar,reason",
    [
        (Grammar("json_schema", '{"type": "nonsense"}'), 'Unsupported type "nonsense"'),
        (Grammar("json_schema", "{oops"), ""),
        (Grammar("regex", "(a"), "parenthesis is not closed"),
        (Grammar("ebnf", "root ::= missing"), 'Rule "missing" is not defined'),
    ],
)
def test_what_cannot_compile_says_why(grammars: Grammars, grammar: Grammar, reason: str) -> None:
    with pytest.raises(GrammarError) as raised:
        grammars.compile(grammar)
    assert reason in str(raised.value) and not str(raised.value).startswith("[")


def test_only_constrained_rows_are_masked_and_they_pick_an_allowed_token(grammars: Grammars, tokenizer) -> None:
    yes = Grammar("ebnf", 'root ::= "yes"')
    greedy, constrained = (
        SamplingParams(max_tokens=4, temperature=0),
        SamplingParams(max_tokens=4, temperature=0, grammar=yes),
    )
    rows = [Row(greedy), Row(constrained, grammars.matcher(yes)), Row(greedy)]
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    grammars.constrain(logits, rows)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(tokenizer.decode([t])) for t in allowed)
    tokens, _ = next_tokens(logits, rows, ())
    unmasked = before.argmax(-1).tolist()
    assert tokens[0] == unmasked[0] and tokens[2] == unmasked[2] and tokens[1] in allowed and unmasked[1] not in allowed


def test_a_complete_grammar_allows_only_the_end_token(grammars: Grammars, tokenizer) -> None:
    matcher = grammars.matcher(Grammar("regex", "ab"))
    for token in tokenizer("ab", add_special_tokens=False)["input_ids"]:
        assert matcher.accept_token(token)
    logits = torch.zeros(1, len(tokenizer))
    grammars.constrain(logits, [Row(SamplingParams(max_tokens=4), matcher)])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    assert matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()
    untouched = torch.zeros(1, len(tokenizer))
    grammars.constrain(untouched, [Row(SamplingParams(max_tokens=4), matcher)])  # a terminated row: no mask
    assert torch.isfinite(untouched).all()


FORECAST = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}


def _accepts(grammars: Grammars, tokenizer, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes the whole text and then the end token."""
    matcher = grammars.matcher(grammar)
    return matcher.accept_string(text) and matcher.accept_token(tokenizer.eos_token_id)


@pytest.mark.parametrize("several", [False, True])
def test_a_forced_call_is_one_of_the_functions_with_valid_arguments(
    grammars: Grammars, tokenizer, several: bool
) -> None:
    hermes = HermesFormat()
    functions = [("get_forecast", FORECAST), ("get_time", None)]
    grammar = Grammar("structural_tag", hermes.calls(functions, several, text=False))
    paris = hermes.render_call({"name": "get_forecast", "arguments": {"city": "Paris", "days": 3}})
    now = hermes.render_call({"name": "get_time", "arguments": "{}"})
    assert _accepts(grammars, tokenizer, grammar, paris)  # what the format renders in a history, the grammar takes
    assert _accepts(grammars, tokenizer, grammar, now)
    assert _accepts(grammars, tokenizer, grammar, f"{paris}\n{now}") == several
    for wrong in (
        "",  # no call at all
        f"Sure. {now}",  # text before the call
        paris.replace("get_forecast", "get_weather"),  # a function not allowed
        paris.replace("3", "9"),  # days out of range
        paris.replace(', "days": 3', ""),  # a required argument missing
        now.replace("{}", '{"zone": "UTC"}'),  # an argument a function without parameters does not take
    ):
        assert not _accepts(grammars, tokenizer, grammar, wrong), wrong


def test_calls_in_free_text_must_be_valid_once_opened(grammars: Grammars, tokenizer) -> None:
    hermes = HermesFormat()
    grammar = Grammar("structural_tag", hermes.calls([("get_forecast", FORECAST)], several=False, text=True))
    paris = hermes.render_call({"name": "get_forecast", "arguments": {"city": "Paris", "days": 3}})
    for right in ("", "No call: a < b.", paris, f"Let me look. {paris}"):
        assert _accepts(grammars, tokenizer, grammar, right), right
    for wrong in (paris.replace("3", "9"), paris.replace("get_forecast", "get_time"), f"{paris}\n{paris}"):
        assert not _accepts(grammars, tokenizer, grammar, wrong), wrong
