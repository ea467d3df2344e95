"""OpenAI's fine-tuning format for function calling, checked: a chat line's `tools`, its assistant messages'
`tool_calls` and its `tool` messages (formats.py calls these for `openai_chat` lines).

Canonical, a tool is {"type": "function", "function": {"name", "description"?, "parameters"?}}, a call
{"id", "type": "function", "function": {"name", "arguments": JSON object text}} and a tool message
{"role": "tool", "content", "tool_call_id"?}: the shapes the API takes, so one tool format renders both
(engine/tool_parsers.py).
"""

from __future__ import annotations

import json
from typing import Any

from bentoservice.training.data.fields import a_list, a_string, an_object, get, invalid, nonempty_text


def _function_type(obj: dict[str, Any], path: str) -> None:
    kind = obj.get("type", "function")
    if kind != "function":
        raise invalid(f"{path}.type", f"must be 'function', got {kind!r}")


def tools(value: Any, path: str = "tools") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for i, item in enumerate(a_list(value, path)):
        where = f"{path}[{i}]"
        _function_type(an_object(item, where), where)
        function = an_object(get(item, f"{where}.function"), f"{where}.function")
        definition: dict[str, Any] = {
            "name": nonempty_text(get(function, f"{where}.function.name"), f"{where}.function.name")
        }
        if function.get("description") is not None:
            definition["description"] = a_string(function["description"], f"{where}.function.description")
        if function.get("parameters") is not None:
            definition["parameters"] = an_object(function["parameters"], f"{where}.function.parameters")
        if any(tool["function"]["name"] == definition["name"] for tool in found):
            raise invalid(f"{where}.function.name", f"repeats the tool name {definition['name']!r}")
        found.append({"type": "function", "function": definition})
    return found


def calls(value: Any, path: str, names: set[str]) -> list[dict[str, Any]]:
    """An assistant message's calls; each names one of the record's tools."""
    if not names:
        raise invalid(path, "needs the line's `tools`, which it does not have")
    made: list[dict[str, Any]] = []
    for i, item in enumerate(a_list(value, path)):
        where = f"{path}[{i}]"
        _function_type(an_object(item, where), where)
        function = an_object(get(item, f"{where}.function"), f"{where}.function")
        name = a_string(get(function, f"{where}.function.name"), f"{where}.function.name")
        if name not in names:
            raise invalid(f"{where}.function.name", f"is {name!r}, which is not one of the line's tools")
        arguments = a_string(get(function, f"{where}.function.arguments"), f"{where}.function.arguments")
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise invalid(f"{where}.function.arguments", "must be a JSON object, as text")
        call_id = a_string(item["id"], f"{where}.id") if item.get("id") is not None else f"call_{i}"
        made.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return made


def answer(message: dict[str, Any], path: str, made: set[str]) -> dict[str, Any]:
    """A tool message's `tool_call_id`, when it has one: the id of a call made before it."""
    if message.get("tool_call_id") is None:
        return {}
    call_id = a_string(message["tool_call_id"], f"{path}.tool_call_id")
    if call_id not in made:
        raise invalid(f"{path}.tool_call_id", f"is {call_id!r}, which no assistant message before it made")
    return {"tool_call_id": call_id}
