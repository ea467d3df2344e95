"""The Hermes tool format: calls read out of a model's text, whole and streamed, and a chat with tools written
into plain messages for a template without tool support."""

from __future__ import annotations

import json

import pytest

from bentoservice.engine.templates import renders_tools
from bentoservice.engine.tool_parsers import Call, StreamParser, tool_format

HERMES = tool_format("hermes")
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_a_plain_answer_has_no_calls() -> None:
    assert HERMES.parse("The capital of France is Paris.") == ("The capital of France is Paris.", [])


def test_calls_and_the_text_around_them() -> None:
    text = (
        'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
    )
    content, calls = HERMES.parse(text)
    assert content == "Let me look."
    assert calls == [Call("weather", '{"city": "Paris"}'), Call("weather", '{"city": "Rome"}')]


@pytest.mark.parametrize(
    "block",
    [
        "not json",
        '["a list"]',
        '{"arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "x"}',
    ],
)
def test_a_block_without_a_valid_call_stays_text(block: str) -> None:
    text = f"before <tool_call>{block}</tool_call> after"
    assert HERMES.parse(text) == (text, [])


def test_an_unclosed_last_call_is_read_when_whole_and_text_otherwise() -> None:
    assert HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}}\n')[1] == [Call("f", "{}")]
    assert HERMES.parse('<tool_call>{"name": "f", "argu') == ('<tool_call>{"name": "f", "argu', [])


def test_streamed_text_in_any_pieces_gives_the_same_calls() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\nDone <tool'
    for size in (1, 2, 3, 7, len(text)):
        parser = StreamParser(HERMES)
        pieces = [p for i in range(0, len(text), size) for p in parser.feed(text[i : i + size])] + parser.finish()
        content = "".join(p for p in pieces if isinstance(p, str))
        assert content == "Sure.\nDone <tool", size
        assert [p for p in pieces if isinstance(p, Call)] == [Call("weather", '{"city": "Paris"}')]


def test_text_that_may_open_a_call_is_held_back_until_it_does_not() -> None:
    parser = StreamParser(HERMES)
    assert parser.feed("Hello <tool") == ["Hello"]  # the space waits for more text
    assert parser.feed("box>") == [" <toolbox>"]


def test_a_chat_with_tools_as_plain_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    plain = HERMES.messages(messages, [WEATHER])
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in plain[0]["content"]
    assert plain[2]["content"] == (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert plain[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    # What the model wrote reads back as the calls it was given.
    assert [c.name for c in HERMES.parse(plain[2]["content"])[1]] == ["weather", "weather"]


def test_a_template_with_tool_support_gets_the_calls_as_objects() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages, tools = HERMES.chat([{"role": "assistant", "content": "", "tool_calls": [call]}], [WEATHER], True)
    assert tools == [WEATHER]
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_which_templates_render_tools() -> None:
    assert renders_tools("{% for t in tools %}{{ t | tojson }}{% endfor %}{{ messages }}")
    assert not renders_tools("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not renders_tools("{% set tools = [] %}{{ tools }}")  # assigned, not given
