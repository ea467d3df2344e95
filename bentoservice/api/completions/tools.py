"""Tool calling on chat completions: the request's `tools`, `tool_choice` and tool history, checked; the reply's
tool calls, whole or streamed as OpenAI streams them (each call's index, id and name first, then its arguments).

The calls are read out of the model's text with the model card's tool format (engine/tool_parsers.py); a model
that answers in plain text gives a plain message. `tool_choice` "required" or a named function is enforced by the
grammar engine: the reply is then calls only, in that format, to the allowed functions, with valid arguments; so
are the calls to `strict` functions under "auto" (`call_grammar`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from bentoservice.api.errors import APIError
from bentoservice.engine.params import Grammar
from bentoservice.engine.tool_parsers import Call, HermesFormat, StreamParser

if TYPE_CHECKING:
    from bentoservice.engine.served import ServedModel

CHOICES = ("none", "auto", "required")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema of the arguments, an object; None: no arguments."""
    strict: bool | None = None
    """True: a call to it follows `parameters` even under tool_choice "auto" (the grammar engine enforces it)."""

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError(f'parameters must be a JSON Schema of "type": "object", not {schema["type"]!r}')
        return schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


def _json_object(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError("arguments must be a JSON object, as text")
    return arguments


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: Annotated[str, AfterValidator(_json_object)]


class ToolCall(_Strict):
    """A call in the history: an assistant message's `tool_calls` as the SDK sends them back."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Named(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _Named


def _tool_choice(value: Any) -> str | NamedToolChoice | None:
    if value is None or value in CHOICES:
        return value
    try:
        return NamedToolChoice.model_validate(value)
    except ValidationError:
        raise ValueError(
            """tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}"""
        ) from None


ToolChoice = Annotated[Any, AfterValidator(_tool_choice)]


def check(body: Any, served: ServedModel) -> None:
    """What the field types cannot say: the request's tools, tool_choice and tool messages fit together and the
    model has a tool format."""
    tools: list[Tool] = body.tools or []
    names = [tool.function.name for tool in tools]
    for name in names:
        if names.count(name) > 1:
            raise APIError(400, f"two tools are named {name!r}", "tools", "invalid_value")
    choice = body.tool_choice
    if choice not in (None, "none") and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
    calls: set[str] = set()
    for i, message in enumerate(body.messages):
        calls.update(call.id for call in message.tool_calls or ())
        if message.role == "tool" and message.tool_call_id not in calls:
            raise APIError(
                400,
                f"a tool message answers the call {message.tool_call_id!r}, which no assistant message before it made",
                f"messages.{i}.tool_call_id",
                "invalid_value",
            )
    if (tools or calls) and served.tool_format is None:
        raise APIError(400, f"{served.name} has no tool format in its model card", "tools", "unsupported_value")


ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}
"""The arguments of a function not marked `strict`, where the grammar checks calls: any JSON object."""


def call_grammar(body: Any, served: ServedModel) -> Grammar | None:
    """The grammar the reply's calls follow, or None where nothing is enforced. tool_choice "required" (calls
    only: one to any of the tools, or several unless `parallel_tool_calls` is false) and a named function (one call
    to it) force a call, its arguments valid under the function's schema; under "auto", tools marked `strict` make
    every call the model opens a valid one (the arguments of the others any object), and text stays free."""
    choice, fmt = body.tool_choice, served.tool_format
    if not body.tools or choice == "none" or fmt is None:
        return None
    several = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        [tool] = [t for t in body.tools if t.function.name == choice.function.name]
        return Grammar("structural_tag", fmt.calls([(tool.function.name, tool.function.parameters)], False, False))
    functions = [t.function for t in body.tools]
    if choice == "required":
        return Grammar("structural_tag", fmt.calls([(f.name, f.parameters) for f in functions], several, False))
    if not any(f.strict for f in functions):
        return None
    schemas = [(f.name, f.parameters if f.strict else ANY_ARGUMENTS) for f in functions]
    return Grammar("structural_tag", fmt.calls(schemas, several, True))


def definitions(body: Any) -> list[dict[str, Any]] | None:
    return [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None


def reply(body: Any, served: ServedModel) -> ToolReply | None:
    """How the reply reads tool calls; None when the model may not call one."""
    if not body.tools or body.tool_choice == "none" or served.tool_format is None:
        return None
    return ToolReply(served.tool_format, body.parallel_tool_calls is not False)


def _call_json(call: Call, index: int | None = None) -> dict[str, Any]:
    at = {} if index is None else {"index": index}
    function = {"name": call.name, "arguments": call.arguments if index is None else ""}
    return {**at, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def _reason(called: bool, reason: str) -> str:
    return "tool_calls" if called and reason == "stop" else reason


@dataclass(frozen=True)
class ToolReply:
    format: HermesFormat
    parallel: bool
    """False: at most one call (`parallel_tool_calls: false`); later ones are dropped."""

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str] | None:
        """The choice's message and finish reason when the text holds calls; None for a plain answer."""
        content, calls = self.format.parse(text)
        if not calls:
            return None
        calls = calls if self.parallel else calls[:1]
        message = {"role": "assistant", "content": content or None, "refusal": None}
        return {"message": {**message, "tool_calls": [_call_json(c) for c in calls]}}, _reason(True, reason)

    def reader(self) -> CallReader:
        return CallReader(self, StreamParser(self.format))


@dataclass
class CallReader:
    """One streamed choice: its text in, its chunks' deltas out."""

    reply: ToolReply
    parser: StreamParser
    calls: int = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text))

    def finish(self, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the choice's finish reason."""
        parts = self._deltas(self.parser.finish())
        return parts, _reason(self.calls > 0, reason)

    def _deltas(self, pieces: list[str | Call]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, str):
                parts.append({"delta": {"content": piece}})
            elif self.reply.parallel or not self.calls:
                head = _call_json(piece, self.calls)
                parts.append({"delta": {"tool_calls": [head]}})
                parts.append(
                    {"delta": {"tool_calls": [{"index": self.calls, "function": {"arguments": piece.arguments}}]}}
                )
                self.calls += 1
        return parts
