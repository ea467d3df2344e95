"""Structured outputs on the wire: OpenAI's `response_format` and vLLM's `structured_outputs` / `guided_*` extras,
or a chat's tool calls that the grammar enforces (api/completions/tools.py), as the engine's `Grammar`, compiled
(and cached, see engine/grammar.py) before the request is queued.

Enforced calls and a structured output of the text are not combined (one grammar per reply; a forced call leaves
no text to shape), so asking for both is a 400 naming the structured output's field (`{"type": "text"}` asks for
nothing and is fine)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from bentoservice.api.completions import tools
from bentoservice.api.completions.protocol import ChatCompletionRequest, ResponseFormat, StructuredOutputs
from bentoservice.api.errors import APIError
from bentoservice.engine.errors import GrammarError
from bentoservice.engine.params import Grammar

if TYPE_CHECKING:
    from bentoservice.api.completions.protocol import CompletionRequest
    from bentoservice.engine.served import ServedModel

FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _json(schema: dict[str, Any] | str, param: str, strict: bool = True) -> Grammar:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"the JSON schema is not JSON: {exc}", param, "invalid_value") from None
    if not isinstance(schema, dict):
        raise APIError(400, "a JSON schema is a JSON object", param, "invalid_value")
    return Grammar.of_schema(schema, strict)


def _choice(options: list[str]) -> Grammar:
    """Exactly one of the strings (JSON's string escapes are EBNF's)."""
    return Grammar("ebnf", "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))


def _of(name: str, value: Any) -> tuple[Grammar | None, str]:
    """The grammar a field asks for, and the field's name to put in an error about it."""
    if isinstance(value, ResponseFormat):
        spec = value.json_schema
        if spec is None or spec.schema_ is None:
            return (None if value.type == "text" else Grammar("json")), name
        return _json(spec.schema_, name, bool(spec.strict)), name
    if isinstance(value, StructuredOutputs):
        given = {k: v for k, v in value.model_dump(by_alias=True).items() if v not in (None, False)}
        if len(given) != 1:
            kinds = ", ".join(f.alias or k for k, f in StructuredOutputs.model_fields.items())
            raise APIError(400, f"{name} takes exactly one of {kinds}", name, "invalid_value")
        kind, spec = given.popitem()
        return _guided(kind, spec, f"{name}.{kind}"), f"{name}.{kind}"
    return _guided(name.removeprefix("guided_"), value, name), name


def _guided(kind: str, spec: Any, param: str) -> Grammar:
    if kind == "json":
        return _json(spec, param)
    if kind == "choice":
        return _choice(spec)
    if kind == "json_object":
        return Grammar("json")
    if kind == "grammar":
        return Grammar("ebnf", spec)
    return Grammar("regex" if kind == "regex" else "structural_tag", spec)


async def grammar_of(body: ChatCompletionRequest | CompletionRequest, served: ServedModel) -> Grammar | None:
    """The grammar a request asks for, compiled off the event loop; None for free text. A grammar the engine
    cannot compile is a 400 naming the field that gave it."""
    given = [(name, value) for name in FIELDS if (value := getattr(body, name)) is not None]
    if len(given) > 1:
        raise APIError(400, f"give one of {', '.join(FIELDS)}, not {given[0][0]} and {given[1][0]}", given[1][0])
    grammar, name = _of(*given[0]) if given else (None, "")
    calls = tools.call_grammar(body, served) if isinstance(body, ChatCompletionRequest) else None
    if calls is not None:
        if grammar is not None:
            raise APIError(
                400,
                f"{name} cannot be combined with tool calls the grammar enforces (tool_choice required or a named "
                "function, or strict tools)",
                name,
                "invalid_value",
            )
        grammar, name = calls, "tools"
    if grammar is None:
        return None
    if body.min_tokens:
        raise APIError(400, f"min_tokens cannot be combined with {name}", "min_tokens", "invalid_value")
    try:
        await run_in_threadpool(served.check_grammar, grammar)
    except GrammarError as exc:
        raise APIError(400, f"the {name} cannot be compiled into a grammar: {exc}", name, "invalid_value") from None
    return grammar
