"""Tool calls in a model's text: how a chat with tools is put to a chat template, and how the model's calls are
read back out of what it writes, whole or as it streams.

A model card names its format (`tool_format`); one format is known: `hermes`, Hermes 2 Pro's, which Qwen2.5's and
SmolLM's templates use: the tools' JSON definitions inside `<tools></tools>` in the system prompt, each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's text, each result as
`<tool_response>...</tool_response>`. A template with its own tool support (one that reads `tools`) renders the
chat's tools and calls itself; the format then only reads the calls back. Pure Python: the HTTP layer and the
training data use it without torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

__all__ = ["DEFAULT", "FORMATS", "Call", "HermesFormat", "StreamParser", "ToolFormatError", "tool_format"]


class ToolFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str
    """A JSON object, as text (OpenAI's `function.arguments`)."""


_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
"""A function defined without `parameters` takes none: its arguments are `{}`."""


def _call(text: str) -> Call | None:
    """The call a `<tool_call>` block holds, or None when it is not one (then it stays text)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return Call(value["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class HermesFormat:
    name: str = "hermes"
    open: str = "<tool_call>"
    close: str = "</tool_call>"

    # -- into the template -------------------------------------------------------------------

    def chat(
        self, messages: list[Message], tools: list[dict[str, Any]] | None, native: bool
    ) -> tuple[list[Message], list[dict[str, Any]] | None]:
        """The messages and `tools` for `apply_chat_template`: as they are (with each call's arguments as an
        object, as templates expect) for a template that renders tools (`native`), else in this format's text."""
        if not native:
            return self.messages(messages, tools or []), None
        return [_arguments_as_objects(m) for m in messages], tools or None

    def messages(self, messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
        """The chat as plain {role, content} messages for a template without tool support: the tools in the
        system prompt, calls in the assistant's content, a run of tool results as one user message."""
        out: list[Message] = []
        if tools:
            listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
            prompt = _HERMES_SYSTEM.format(tools=listed)
            if messages and messages[0]["role"] == "system":
                prompt = f"{messages[0]['content']}\n\n{prompt}"
                messages = messages[1:]
            out.append({"role": "system", "content": prompt})
        for message in messages:
            if message["role"] == "tool":
                response = f"<tool_response>\n{message['content']}\n</tool_response>"
                if out and out[-1].get("tool_responses"):
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response, "tool_responses": True})
            elif message.get("tool_calls"):
                calls = [self.render_call(call["function"]) for call in message["tool_calls"]]
                text = message.get("content") or ""
                out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + calls)})
            else:
                out.append({"role": message["role"], "content": message.get("content") or ""})
        return [{"role": m["role"], "content": m["content"]} for m in out]

    def render_call(self, function: dict[str, Any]) -> str:
        arguments = function["arguments"]
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        return f"{self.open}\n{body}\n{self.close}"

    # -- calls the grammar engine enforces ------------------------------------------------------

    def calls(self, functions: Sequence[tuple[str, dict[str, Any] | None]], several: bool, text: bool) -> str:
        """xgrammar's structural tag (as JSON) for calls written as `render_call` writes them, each to one of
        `functions` (name, JSON schema of the arguments, an object; None: no arguments) with arguments valid under
        that function's schema (no properties beyond those it names unless it allows more, as xgrammar compiles
        schemas). `text`: free text in which each call the model opens must be such a call, and none is needed;
        else the reply is calls only, at least one, a line apart. `several`: more than one call."""
        tags = [
            {
                "type": "tag",
                "begin": f'{self.open}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ',
                "content": {
                    "type": "json_schema",
                    "json_schema": NO_ARGUMENTS if schema is None else {"type": "object", **schema},
                    "max_whitespace_cnt": 1,  # `render_call`'s spacing, and no endless padding
                },
                "end": f"}}\n{self.close}",
            }
            for name, schema in functions
        ]
        if text:
            calls: dict[str, Any] = {"type": "triggered_tags", "triggers": [self.open], "tags": tags}
        else:
            calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
        return json.dumps({"type": "structural_tag", "format": {**calls, "stop_after_first": not several}})

    # -- out of the model's text -------------------------------------------------------------

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """The text outside the calls (stripped) and the calls, in order. A block that holds no valid call stays
        in the text; a last block the model did not close is read if it holds a whole call."""
        parser = StreamParser(self)
        pieces = parser.feed(text) + parser.finish()
        content = "".join(p for p in pieces if isinstance(p, str))
        return content.strip(), [p for p in pieces if isinstance(p, Call)]


def _arguments_as_objects(message: Message) -> Message:
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        calls.append({**call, "function": {**call["function"], "arguments": parsed}})
    return {**message, "tool_calls": calls}


DEFAULT = "hermes"
"""The format of a model without a card."""
FORMATS: dict[str, HermesFormat] = {"hermes": HermesFormat()}


def tool_format(name: str) -> HermesFormat:
    if name not in FORMATS:
        raise ToolFormatError(f"unknown tool format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


@dataclass
class StreamParser:
    """Reads a model's text as it comes: text outside calls goes out at once, except a tail that may be the start
    of `<tool_call>`; a call goes out once its block is closed."""

    format: HermesFormat
    _held: str = ""
    _inside: bool = False
    calls: int = 0
    _space: str = ""
    """Whitespace after text, held until more text follows (dropped before a call and at the end)."""
    _pieces: list[str | Call] = field(default_factory=list)

    def feed(self, text: str) -> list[str | Call]:
        self._held += text
        self._pieces = []
        while self._step():
            pass
        return self._pieces

    def finish(self) -> list[str | Call]:
        """What is left when the model stops: held text, or an unclosed last call."""
        self._pieces = []
        if self._inside:
            call = _call(self._held)
            self._emit(call if call else self.format.open + self._held)
        elif self._held:
            self._emit(self._held)
        self._held, self._inside = "", False
        return self._pieces

    def _emit(self, piece: str | Call) -> None:
        if isinstance(piece, Call):
            self.calls += 1
            self._space = ""
        else:  # a text's trailing whitespace waits: it goes before more text, not before a call or the end
            body = piece.rstrip()
            if not body:
                self._space += piece
                return
            piece, self._space = self._space + body, piece[len(body) :]
        self._pieces.append(piece)

    def _step(self) -> bool:
        tag = self.format.close if self._inside else self.format.open
        at = self._held.find(tag)
        if at < 0:
            if not self._inside:  # all but a tail that could open a tag
                keep = _partial_suffix(self._held, tag)
                self._emit(self._held[: len(self._held) - keep])
                self._held = self._held[len(self._held) - keep :]
            return False
        before, self._held = self._held[:at], self._held[at + len(tag) :]
        if self._inside:
            call = _call(before)
            self._emit(call if call else self.format.open + before + tag)
        else:
            self._emit(before)
        self._inside = not self._inside
        return True


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
