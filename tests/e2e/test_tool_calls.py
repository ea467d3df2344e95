"""Tool calling through the real server and the official openai SDK: SmolLM2 with tools in its prompt (the Hermes
format its card names), its calls read back as `tool_calls`, whole and streamed, a tool result sent back; a call
forced by tool_choice "required" or a named function (the tiny random model, which never writes a call by itself,
gives valid ones: the grammar alone makes them); and each bad tools request refused with a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from conftest import Server
from openai.types.chat import ChatCompletion

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# SmolLM2-135M does not decide to call a tool by itself; asked to repeat a call, greedy, it writes one.
REPEAT: Any = [{"role": "user", "content": f"Repeat this text exactly, with nothing else:\n{CALL}"}]
GREEDY: Any = {"model": "smollm2", "temperature": 0, "max_tokens": 40}


def test_a_tool_round_trip(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    reply = client.chat.completions.create(messages=REPEAT, tools=[WEATHER], **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    # The assistant's message goes back as the SDK gives it, with the tool's result.
    history = [*REPEAT, choice.message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})})
    answer = client.chat.completions.create(messages=history, tools=[WEATHER], **GREEDY)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and answer.usage.prompt_tokens > reply.usage.prompt_tokens  # type: ignore[union-attr]


def test_streamed_tool_calls_accumulate_to_the_call(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    chunks = list(client.chat.completions.create(messages=REPEAT, tools=[WEATHER], stream=True, **GREEDY))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].index == 0 and deltas[0][0].id and deltas[0][0].function.name == "get_weather"  # type: ignore[union-attr]
    assert all(d[0].id is None and d[0].function.name is None for d in deltas[1:])  # type: ignore[union-attr]
    assert json.loads("".join(d[0].function.arguments or "" for d in deltas)) == {"city": "Paris"}  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The SDK's stream helper accumulates the same deltas into the message.
    with client.chat.completions.stream(messages=REPEAT, tools=[WEATHER], **GREEDY) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_a_plain_answer_give_text(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    none = client.chat.completions.create(messages=REPEAT, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    assert "<tool_call>" in (none.choices[0].message.content or "")  # the text, not read as a call

    question: Any = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(messages=question, tools=[WEATHER], **GREEDY)
    assert plain.choices[0].message.tool_calls is None and "Paris" in (plain.choices[0].message.content or "")
    streamed = client.chat.completions.create(messages=question, tools=[WEATHER], stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == (plain.choices[0].message.content or "").rstrip()


def test_parallel_tool_calls_false_keeps_one_call(smollm2_server: Server) -> None:
    two = f"{CALL}\n{CALL.replace('Paris', 'Rome')}"
    messages: Any = [{"role": "user", "content": f"Repeat this text exactly, with nothing else:\n{two}"}]
    client = smollm2_server.client()
    both = client.chat.completions.create(messages=messages, tools=[WEATHER], **{**GREEDY, "max_tokens": 80})
    one = client.chat.completions.create(
        messages=messages, tools=[WEATHER], parallel_tool_calls=False, **{**GREEDY, "max_tokens": 80}
    )
    assert len(both.choices[0].message.tool_calls or []) == 2
    assert len(one.choices[0].message.tool_calls or []) == 1


JSON_OBJECT = {"type": "json_object"}
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}
UNCOMPILABLE = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "no"}}}}}
STRICT: Any = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
NAMELESS = {"type": "function", "function": {"description": "no name"}}
STRING_ARGS = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
LIST_ARGS = {"type": "function", "function": {"name": "f", "parameters": ["city"]}}
ASKED = {
    "role": "assistant",
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [NAMELESS]}, "tools.0.function.name"),
        ({"tools": [STRING_ARGS]}, "tools.0.function.parameters"),
        ({"tools": [LIST_ARGS]}, "tools.0.function.parameters"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": JSON_OBJECT}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": NAMED, "extra_body": {"min_tokens": 2}}, "min_tokens"),
        ({"tools": [UNCOMPILABLE], "tool_choice": "required"}, "tools"),
        ({"tools": [STRICT], "response_format": JSON_OBJECT}, "response_format"),  # auto, with a strict tool
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"messages": [*REPEAT, {"role": "tool", "tool_call_id": "c9", "content": "x"}]}, "messages.1.tool_call_id"),
        ({"messages": [*REPEAT, ASKED, {"role": "tool", "content": "x"}]}, "messages.2"),
        (
            {
                "messages": [
                    *REPEAT,
                    {**ASKED, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "x"}}]},
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
        ),
        ({"functions": [WEATHER["function"]]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(smollm2_server: Server, body: dict[str, Any], param: str) -> None:
    client = smollm2_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"messages": REPEAT, **GREEDY, **body})
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body  # type: ignore[index]


FORECAST: Any = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK: Any = {"type": "function", "function": {"name": "get_time", "description": "takes no arguments"}}
SCHEMAS = {"get_forecast": FORECAST["function"]["parameters"], "get_time": {"type": "object", "maxProperties": 0}}
HI: Any = [{"role": "user", "content": "hi"}]
FORCED: Any = {"model": "tiny", "messages": HI, "tools": [FORECAST, CLOCK], "max_tokens": 150, "temperature": 1}


def _valid_calls(reply: ChatCompletion, names: frozenset[str] = frozenset(SCHEMAS)) -> list[tuple[str, dict[str, Any]]]:
    """The reply's calls, each to one of `names` with arguments valid under that function's schema."""
    calls = []
    for call in reply.choices[0].message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def test_tool_choice_required_makes_a_random_model_call(tiny_server: Server) -> None:
    client = tiny_server.client()
    for seed in range(3):
        reply = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, seed=seed, **FORCED)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert len(_valid_calls(reply)) == 1
        several = client.chat.completions.create(tool_choice="required", seed=seed, **FORCED)
        # Calls follow each other until the model ends (then "tool_calls") or max_tokens cuts the last one.
        assert several.choices[0].finish_reason in ("tool_calls", "length") and _valid_calls(several)
        if several.choices[0].finish_reason == "tool_calls":
            assert several.choices[0].message.content is None
    free = client.chat.completions.create(**{**FORCED, "temperature": 0, "max_tokens": 24})
    assert free.choices[0].message.tool_calls is None  # unforced, the same model writes no call


def test_a_named_function_is_called_whole_and_streamed(tiny_server: Server) -> None:
    client = tiny_server.client()
    named: Any = {"type": "function", "function": {"name": "get_forecast"}}
    for seed in range(2):
        reply = client.chat.completions.create(tool_choice=named, seed=seed, **FORCED)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        [(name, arguments)] = _valid_calls(reply, frozenset({"get_forecast"}))
        assert {"city", "days"} <= set(arguments)

    chunks = list(client.chat.completions.create(tool_choice=named, seed=1, stream=True, **FORCED))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].index == 0 and deltas[0][0].function.name == "get_forecast"  # type: ignore[union-attr]
    arguments = json.loads("".join(d[0].function.arguments or "" for d in deltas))  # type: ignore[union-attr]
    jsonschema.validate(arguments, SCHEMAS["get_forecast"])
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(tool_choice=named, seed=1, **FORCED)
    assert json.loads((whole.choices[0].message.tool_calls or [])[0].function.arguments) == arguments

    with client.chat.completions.stream(tool_choice="required", parallel_tool_calls=False, seed=2, **FORCED) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls" and len(_valid_calls(final)) == 1


def test_forced_calls_in_a_batch_with_free_rows(tiny_server: Server) -> None:
    """Free rows and forced rows at once: each forced row calls validly, each free greedy row says what it says
    alone."""
    free: Any = {"model": "tiny", "messages": HI, "max_tokens": 24, "temperature": 0}
    alone = tiny_server.client().chat.completions.create(**free).choices[0].message.content

    async def run() -> list[ChatCompletion]:
        client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="none", max_retries=0)
        return await asyncio.gather(
            client.chat.completions.create(**free),
            client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, seed=0, **FORCED),
            client.chat.completions.create(**free),
            client.chat.completions.create(
                tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=1, **FORCED
            ),
        )

    plain, required, plain_again, named = asyncio.run(run())
    assert plain.choices[0].message.content == alone == plain_again.choices[0].message.content
    assert len(_valid_calls(required)) == 1 and required.choices[0].finish_reason == "tool_calls"
    assert _valid_calls(named, frozenset({"get_time"})) == [("get_time", {})]


def test_smollm2_fills_a_named_functions_arguments(smollm2_server: Server) -> None:
    question: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    reply = smollm2_server.client().chat.completions.create(
        messages=question, tools=[WEATHER], tool_choice=NAMED, **GREEDY
    )
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_strict_tools_make_the_calls_the_model_opens_valid(smollm2_server: Server) -> None:
    """Under tool_choice "auto": asked to repeat a call whose arguments break the schema, SmolLM2 repeats it as it
    is, unless the tool is strict; a plain answer stays the same text."""
    client = smollm2_server.client()
    for wrong in ('{"town": "Paris"}', "{}"):
        repeat: Any = [{"role": "user", "content": f"Repeat this text exactly, with nothing else:\n{CALL}"}]
        repeat[0]["content"] = repeat[0]["content"].replace('{"city": "Paris"}', wrong)
        loose = client.chat.completions.create(messages=repeat, tools=[WEATHER], **GREEDY)
        strict = client.chat.completions.create(messages=repeat, tools=[STRICT], **GREEDY)
        assert json.loads((loose.choices[0].message.tool_calls or [])[0].function.arguments) == json.loads(wrong)
        assert strict.choices[0].finish_reason == "tool_calls"
        [call] = strict.choices[0].message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    question: Any = [{"role": "user", "content": "What is the capital of France?"}]
    answers = [
        client.chat.completions.create(messages=question, tools=[tool], **GREEDY).choices[0].message
        for tool in (WEATHER, STRICT)
    ]
    assert answers[0].content == answers[1].content and "Paris" in (answers[1].content or "")
    assert answers[1].tool_calls is None
