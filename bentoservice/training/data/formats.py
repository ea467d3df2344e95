"""Training files: detect the format, validate every record and convert it to canonical rows.

The HTTP layer imports this to check uploads, so it must stay free of torch and transformers. The small
validators that name the bad field live in fields.py, the checks of tool calls in tool_calls.py.

A file is JSON Lines (one record per line) or a JSON array of records, in one of these formats:

- `openai_chat`: {"messages": [{"role", "content"}, ...]}, with OpenAI's function calling: the line's
  `tools`, assistant messages with `tool_calls`, `tool` messages with the results
- `sharegpt`: {"conversations": [{"from": "human"|"gpt"|..., "value"}, ...]}
- `alpaca`: {"instruction", "input" (optional), "output"}
- `prompt_completion`: {"prompt", "completion"}
- `preference`: {"prompt", "chosen", "rejected"}, each a string or a list of messages
- `openai_preference`: {"input": {"messages"}, "preferred_output", "non_preferred_output"}
- `flag_embedding`: {"query", "pos": [passages], "neg": [passages], "prompt" (optional)}, FlagEmbedding's
  format for rerank and embedding models
- `openai_prompts`: {"messages": [... ending with a user turn], any other fields}, OpenAI's reinforcement
  fine-tuning lines: a prompt and the fields its grader reads (`{{item.*}}`); chosen when a file's first record
  ends with a user turn and the job does not expect another kind

Canonical rows:

- SFT: {"messages": [...]}: an optional system message, then user and assistant turns alternating,
  ending with the assistant; with tools, {"messages", "tools"}, where an assistant turn may be tool calls
  followed by one or more tool messages.
- Preference: {"prompt": [... ending with a user turn], "chosen": [assistant ...],
  "rejected": [assistant ...]}.
- Rerank: {"query": str, "pos": [str, ...], "neg": [str, ...]}: at least one positive passage, any number
  of negatives; a record's `prompt` (an instruction) is put in front of its query.
- Prompts: {"prompt": [... ending with a user turn], "item": the whole record, as the grader sees it}.

Every message is {"role": "system"|"user"|"assistant", "content": str}, plus `tool_calls` on an assistant's
calls and role "tool" with an optional `tool_call_id` (tool_calls.py has their shapes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bentoservice.training.data import tool_calls
from bentoservice.training.data.fields import (
    DataFormatError,
    Unit,
    a_list,
    a_string,
    an_object,
    get,
    invalid,
    json_type,
    message_content,
    nonempty_text,
)

log = logging.getLogger(__name__)

Kind = Literal["sft", "preference", "rerank", "prompts"]
Role = Literal["system", "user", "assistant", "tool"]
Turn = Role | Literal["calls"]
"""What a message was, for the next one's check: "calls" is an assistant's tool calls."""
Message = dict[str, Any]
Row = dict[str, Any]

__all__ = ["DataFormatError", "Dataset", "Kind", "check_lengths", "load_file", "parse_bytes"]


@dataclass
class Dataset:
    format: str
    """openai_chat, sharegpt, alpaca, prompt_completion, preference, openai_preference, flag_embedding or
    openai_prompts."""
    kind: Kind
    rows: list[Row]
    lines: list[int] = field(default_factory=list)
    """The source line (or array record) of each row, 1-based; rows are numbered from 1 when not given."""
    unit: Unit = "line"

    def __post_init__(self) -> None:
        if not self.lines:
            self.lines = list(range(1, len(self.rows) + 1))


def parse_bytes(data: bytes, filename: str = "", expect: Kind | None = None) -> Dataset:
    """Validate a whole training file and convert it; raises DataFormatError at the first problem."""
    records, unit = _records(_decode(data))
    dataset = _convert(records, unit, expect)
    log.info(
        "%s: %d %s rows in %s format", filename or "training data", len(dataset.rows), dataset.kind, dataset.format
    )
    return dataset


def load_file(path: str | Path, expect: Kind | None = None) -> Dataset:
    path = Path(path)
    return parse_bytes(path.read_bytes(), path.name, expect)


def check_lengths(ds: Dataset, count_tokens: Callable[[Row], int], max_seq_length: int) -> None:
    """Raise DataFormatError for the first row longer than max_seq_length tokens."""
    for row, line in zip(ds.rows, ds.lines, strict=True):
        tokens = count_tokens(row)
        if tokens > max_seq_length:
            raise DataFormatError(
                f"the example is {tokens} tokens long, more than max_seq_length "
                f"{max_seq_length}; shorten it or raise max_seq_length",
                line,
                unit=ds.unit,
            )


# --- files -------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"the file is not UTF-8 (byte 0x{data[err.start]:02x}); save it as UTF-8", line) from None


def _records(text: str) -> tuple[Iterable[tuple[int, Any]], Unit]:
    """The (line or record number, value) of each record, and which of the two the numbers are."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        # More data after a one-line first value means JSON Lines, whatever that first line holds.
        one_line_then_more = err.msg == "Extra data" and "\n" not in text[: err.pos].strip()
        if text.lstrip().startswith("[") and not one_line_then_more:
            raise DataFormatError(f"invalid JSON: {err.msg} (column {err.colno})", err.lineno) from None
        return _json_lines(text), "line"
    if isinstance(whole, list):
        return enumerate(whole, 1), "record"
    # A single JSON value: a one-line JSON Lines file, or one record spread over several lines.
    return [(text.count("\n", 0, len(text) - len(text.lstrip())) + 1, whole)], "line"


def _json_lines(text: str) -> Iterator[tuple[int, Any]]:
    # Not splitlines(): it also splits on U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"invalid JSON: {err.msg} (column {err.colno})", number) from None


def _convert(records: Iterable[tuple[int, Any]], unit: Unit, expect: Kind | None) -> Dataset:
    fmt: _Format | None = None
    rows: list[Row] = []
    lines: list[int] = []
    for line, record in records:
        with _located(line, unit):
            found = _detect(record, fmt, expect)
            if fmt is not None and found is not fmt:
                raise DataFormatError(
                    f"this record is {found.label} but the file is {fmt.label}, as {unit} "
                    f"{lines[0]} shows; use one format per file"
                )
            row = found.convert(record)
        if fmt is None:
            fmt = found
            _check_kind(fmt, expect)
        rows.append(row)
        lines.append(line)
    if fmt is None:
        raise DataFormatError("the file is empty: it has no records")
    return Dataset(fmt.name, fmt.kind, rows, lines, unit)


@contextmanager
def _located(line: int, unit: Unit) -> Iterator[None]:
    try:
        yield
    except DataFormatError as err:
        err.line, err.unit = line, unit
        raise


_KIND_NAMES: dict[str, tuple[str, str]] = {
    "sft": ("SFT data", "SFT data (conversations, instructions or prompt/completion)"),
    "preference": ("preference data", "preference pairs (prompt, chosen, rejected)"),
    "rerank": ("rerank data", "rerank data (query, pos, neg)"),
    "prompts": ("chat prompts", "chat prompts (messages ending with a user turn, and the fields the grader reads)"),
}


def _check_kind(fmt: _Format, expect: Kind | None) -> None:
    if expect is None or fmt.kind == expect:
        return
    raise DataFormatError(
        f"this is {_KIND_NAMES[fmt.kind][0]} but the job needs {_KIND_NAMES[expect][1]}; the file is {fmt.label}"
    )


def _detect(record: Any, previous: _Format | None, expect: Kind | None) -> _Format:
    """The record's format; once a file's first record chose one of two formats with the same keys (a chat, or a
    prompt), the rest of the file is held to that one."""
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {json_type(record)}")
    if previous is not None and any(key in record for key in previous.keys):
        return previous
    for fmt in _FORMATS:
        if any(key in record for key in fmt.keys) and (fmt.kind != "prompts" or expect in (None, "prompts")):
            if fmt.when(record):
                return fmt
    if "prompt" in record:
        raise invalid("completion", "is missing (or, for a preference pair, chosen and rejected)")
    keys = ", ".join(repr(key) for key in record) or "none"
    expected = ", ".join(fmt.label for fmt in _FORMATS)
    raise DataFormatError(f"no known fields (keys: {keys}); expected one of {expected}")


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    role_key: str
    content_key: str
    roles: dict[str, Role]
    """The role names the dialect accepts, to the canonical role."""


_OPENAI = _Dialect("role", "content", {"system": "system", "user": "user", "assistant": "assistant"})
_OPENAI_CHAT = _Dialect("role", "content", {**_OPENAI.roles, "tool": "tool"})
"""OpenAI's chat fine-tuning lines, which may hold tool calls and tool results (tool_calls.py)."""
_SHAREGPT = _Dialect(
    "from", "value", {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
)


def _messages(
    value: Any, path: str, dialect: _Dialect, *, after: Role | None, last: Role, tools: set[str] | None = None
) -> list[Message]:
    """Validate a list of messages that follows an `after` turn (None: it starts the conversation).

    Only a conversation's first message may be a system message; then user and assistant alternate,
    and the list must end with a `last` turn. With `tools` (the names of the record's tools), an assistant
    message may make tool calls instead, answered by tool messages before the assistant speaks again.
    """
    messages: list[Message] = []
    previous: Turn | None = after
    calls: set[str] = set()
    for i, item in enumerate(a_list(value, path)):
        where = f"{path}[{i}]"
        message = an_object(item, where)
        role_path = f"{where}.{dialect.role_key}"
        name = a_string(get(message, role_path), role_path)
        if name not in dialect.roles:
            allowed = ", ".join(repr(role) for role in dialect.roles)
            raise invalid(role_path, f"must be one of {allowed}, got {name!r}")
        role = dialect.roles[name]
        _check_turn(role, name, previous, role_path, system_allowed=i == 0 and after is None)
        content_path = f"{where}.{dialect.content_key}"
        if tools is not None and role == "assistant" and message.get("tool_calls"):
            made = tool_calls.calls(message["tool_calls"], f"{where}.tool_calls", tools)
            calls.update(call["id"] for call in made)
            said = message.get(dialect.content_key)
            text = "" if said in (None, "") else message_content(said, content_path)
            messages.append({"role": role, "content": text, "tool_calls": made})
            previous = "calls"
            continue
        messages.append({"role": role, "content": message_content(get(message, content_path), content_path)})
        if role == "tool":
            messages[-1].update(tool_calls.answer(message, where, calls))
        if role != "system":
            previous = role
    if messages[-1]["role"] != last:
        raise invalid(
            path,
            f"must end with {'an' if last == 'assistant' else 'a'} {last!r} message, "
            f"but the last one is {messages[-1]['role']!r}",
        )
    return messages


_NEXT: dict[Turn | None, tuple[Role, ...]] = {
    None: ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
    "calls": ("tool",),
    "tool": ("tool", "assistant"),
}


def _check_turn(role: Role, name: str, previous: Turn | None, path: str, system_allowed: bool) -> None:
    shown = repr(name) if name == role else f"{name!r} ({role})"
    if role == "system":
        if not system_allowed:
            raise invalid(path, f"is {shown}, but only a conversation's first message may be a system one")
        return
    expected = _NEXT[previous]
    if role not in expected:
        context = "to start the conversation" if previous is None else f"after {previous!r}"
        if previous == "calls":
            context = "after an assistant's tool_calls"
        raise invalid(path, f"must be {' or '.join(map(repr, expected))} {context}, got {shown}")


def _turns(value: Any, path: str, *, after: Role | None, last: Role) -> list[Message]:
    """A string (one `last` message) or a list of OpenAI messages."""
    if isinstance(value, str):
        return [{"role": last, "content": nonempty_text(value, path)}]
    if isinstance(value, list):
        return _messages(value, path, _OPENAI, after=after, last=last)
    raise invalid(path, f"must be a string or a list of messages, got {json_type(value)}")


def _prompt(value: Any, path: str) -> list[Message]:
    return _turns(value, path, after=None, last="user")


def _reply(value: Any, path: str) -> list[Message]:
    return _turns(value, path, after="user", last="assistant")


# --- formats -----------------------------------------------------------------------------------


def _openai_chat(record: dict[str, Any]) -> Row:
    tools = tool_calls.tools(record["tools"]) if record.get("tools") is not None else []
    names = {tool["function"]["name"] for tool in tools}
    conversation = _messages(
        get(record, "messages"), "messages", _OPENAI_CHAT, after=None, last="assistant", tools=names
    )
    return {"messages": conversation, "tools": tools} if tools else {"messages": conversation}


def _sharegpt(record: dict[str, Any]) -> Row:
    conversation = _messages(get(record, "conversations"), "conversations", _SHAREGPT, after=None, last="assistant")
    return {"messages": conversation}


def _alpaca(record: dict[str, Any]) -> Row:
    instruction = nonempty_text(get(record, "instruction"), "instruction")
    # null means no input: datasets exported with pandas or HF datasets often write it that way.
    extra = "" if record.get("input") is None else a_string(record["input"], "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": nonempty_text(get(record, "output"), "output")},
        ]
    }


def _prompt_completion(record: dict[str, Any]) -> Row:
    return {"messages": _prompt(get(record, "prompt"), "prompt") + _reply(get(record, "completion"), "completion")}


def _preference(record: dict[str, Any]) -> Row:
    return {
        "prompt": _prompt(get(record, "prompt"), "prompt"),
        "chosen": _reply(get(record, "chosen"), "chosen"),
        "rejected": _reply(get(record, "rejected"), "rejected"),
    }


def _openai_preference(record: dict[str, Any]) -> Row:
    prompt = an_object(get(record, "input"), "input")
    return {
        "prompt": _messages(get(prompt, "input.messages"), "input.messages", _OPENAI, after=None, last="user"),
        "chosen": _messages(
            get(record, "preferred_output"), "preferred_output", _OPENAI, after="user", last="assistant"
        ),
        "rejected": _messages(
            get(record, "non_preferred_output"), "non_preferred_output", _OPENAI, after="user", last="assistant"
        ),
    }


def _passages(value: Any, path: str, *, required: bool) -> list[str]:
    if not isinstance(value, list):
        raise invalid(path, f"must be a list of passages, got {json_type(value)}")
    if required and not value:
        raise invalid(path, "is empty")
    return [nonempty_text(passage, f"{path}[{i}]") for i, passage in enumerate(value)]


def _flag_embedding(record: dict[str, Any]) -> Row:
    query = nonempty_text(get(record, "query"), "query")
    instruction = "" if record.get("prompt") is None else a_string(record["prompt"], "prompt")
    return {
        "query": instruction + query,
        "pos": _passages(get(record, "pos"), "pos", required=True),
        "neg": _passages(record.get("neg", []), "neg", required=False),
    }


def _openai_prompts(record: dict[str, Any]) -> Row:
    prompt = _messages(get(record, "messages"), "messages", _OPENAI, after=None, last="user")
    return {"prompt": prompt, "item": record}


def _ends_with_user(record: dict[str, Any]) -> bool:
    messages = record.get("messages")
    return (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[-1], dict)
        and (messages[-1].get("role") == "user")
    )


@dataclass(frozen=True)
class _Format:
    name: str
    kind: Kind
    label: str
    keys: tuple[str, ...]
    """Any of these keys marks a record as this format (the first in _FORMATS wins)."""
    convert: Callable[[dict[str, Any]], Row]
    when: Callable[[dict[str, Any]], bool] = lambda record: True
    """A record with those keys is this format only when this holds too."""


_FORMATS = (
    _Format(
        "openai_prompts", "prompts", "OpenAI chat prompts (messages)", ("messages",), _openai_prompts, _ends_with_user
    ),
    _Format("openai_chat", "sft", "OpenAI chat (messages)", ("messages",), _openai_chat),
    _Format("sharegpt", "sft", "ShareGPT (conversations)", ("conversations",), _sharegpt),
    _Format("alpaca", "sft", "Alpaca (instruction, input, output)", ("instruction", "output"), _alpaca),
    _Format("prompt_completion", "sft", "prompt/completion", ("completion",), _prompt_completion),
    _Format("preference", "preference", "preference (prompt, chosen, rejected)", ("chosen", "rejected"), _preference),
    _Format(
        "openai_preference",
        "preference",
        "OpenAI preference (input, preferred_output, non_preferred_output)",
        ("preferred_output", "non_preferred_output"),
        _openai_preference,
    ),
    _Format("flag_embedding", "rerank", "FlagEmbedding (query, pos, neg)", ("query", "pos"), _flag_embedding),
)
