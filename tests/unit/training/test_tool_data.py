"""OpenAI's function-calling fine-tuning lines: accepted as canonical rows with their tools, and each malformed one
refused with its line and field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bentoservice.training.data.formats import DataFormatError, parse_bytes

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {
    "role": "assistant",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}
ANSWER = {"role": "assistant", "content": "21 degrees."}


def line(messages: list[dict[str, Any]], **record: Any) -> dict[str, Any]:
    return {"messages": messages, "tools": [WEATHER], "parallel_tool_calls": False, **record}


def test_calls_results_and_the_answer_become_a_row_with_its_tools() -> None:
    data = "\n".join(json.dumps(r) for r in [line([USER, CALL]), line([USER, CALL, RESULT, ANSWER])]).encode()
    ds = parse_bytes(data)
    assert (ds.format, ds.kind) == ("openai_chat", "sft")
    call = {"role": "assistant", "content": "", "tool_calls": CALL["tool_calls"]}
    assert ds.rows == [
        {"messages": [USER, call], "tools": [WEATHER]},
        {"messages": [USER, call, RESULT, ANSWER], "tools": [WEATHER]},
    ]


def _call(**function: Any) -> dict[str, Any]:
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": function}]}


BAD = [
    (line([USER, _call(name="get_time", arguments="{}")]), "messages[1].tool_calls[0].function.name"),
    (line([USER, _call(name="get_weather", arguments="Paris")]), "messages[1].tool_calls[0].function.arguments"),
    (line([USER, _call(name="get_weather", arguments="[1]")]), "messages[1].tool_calls[0].function.arguments"),
    (line([USER, _call(name="get_weather")]), "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [USER, CALL]}, "messages[1].tool_calls"),  # calls without the line's tools
    (line([USER, CALL, {**RESULT, "tool_call_id": "call_9"}, ANSWER]), "messages[2].tool_call_id"),
    (line([USER, CALL, ANSWER]), "messages[2].role"),  # the call's result is missing
    (line([USER, RESULT, ANSWER]), "messages[1].role"),  # a result no call asked for
    (line([USER, CALL, RESULT]), "messages"),  # ends with a tool message
    (
        line([USER, ANSWER], tools=[{"type": "function", "function": {"description": "no name"}}]),
        "tools[0].function.name",
    ),
    (
        line([USER, ANSWER], tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
        "tools[0].function.parameters",
    ),
    (line([USER, ANSWER], tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools[0].type"),
    (line([USER, ANSWER], tools=[WEATHER, WEATHER]), "tools[1].function.name"),
]


@pytest.mark.parametrize(("bad", "field"), BAD)
def test_a_bad_tool_line_names_its_line_and_field(bad: dict[str, Any], field: str) -> None:
    good = json.dumps(line([USER, CALL, RESULT, ANSWER]))
    with pytest.raises(DataFormatError) as info:
        parse_bytes(f"{good}\n{json.dumps(bad)}\n".encode())
    assert (info.value.line, info.value.field) == (2, field)
    assert str(info.value).startswith(f"line 2: {field} ")
