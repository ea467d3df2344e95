"""Training files: detect the format, validate every record and convert it to canonical rows.

The HTTP layer imports this to check uploads, so it must stay free of torch and transformers. It is one module
of a little over 400 lines because every format's converter and the checks that name the bad line and field
share one set of small validators and one table (`_FORMATS`); apart, each would read only half of it.

A file is JSON Lines (one record per line) or a JSON array of records, in one of these formats:

- `openai_chat`: {"messages": [{"role", "content"}, ...]}
- `sharegpt`: {"conversations": [{"from": "human"|"gpt"|..., "value"}, ...]}
- `alpaca`: {"instruction", "input" (optional), "output"}
- `prompt_completion`: {"prompt", "completion"}
- `preference`: {"prompt", "chosen", "rejected"}, each a string or a list of messages
- `openai_preference`: {"input": {"messages"}, "preferred_output", "non_preferred_output"}
- `flag_embedding`: {"query", "pos": [passages], "neg": [passages], "prompt" (optional)}, FlagEmbedding's
  format for rerank and embedding models

Canonical rows:

- SFT: {"messages": [...]}: an optional system message, then user and assistant turns alternating,
  ending with the assistant.
- Preference: {"prompt": [... ending with a user turn], "chosen": [assistant ...],
  "rejected": [assistant ...]}.
- Rerank: {"query": str, "pos": [str, ...], "neg": [str, ...]}: at least one positive passage, any number
  of negatives; a record's `prompt` (an instruction) is put in front of its query.

Every message is {"role": "system"|"user"|"assistant", "content": str}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["sft", "preference", "rerank"]
Role = Literal["system", "user", "assistant"]
Unit = Literal["line", "record"]
Message = dict[str, str]
Row = dict[str, Any]

__all__ = ["DataFormatError", "Dataset", "Kind", "check_lengths", "load_file", "parse_bytes"]


class DataFormatError(ValueError):
    """A problem with a training file, for the user.

    `line` is the 1-based line of a JSON Lines file or the 1-based record of a JSON array (`unit` says
    which), `field` the path of the offending field, e.g. "messages[1].role"; both are None for problems
    with the whole file.
    """

    def __init__(self, problem: str, line: int | None = None, field: str | None = None, unit: Unit = "line") -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line
        self.field = field
        self.unit = unit

    def __str__(self) -> str:
        return self.problem if self.line is None else f"{self.unit} {self.line}: {self.problem}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps line and field when the error is pickled, e.g. on its way out of a worker process.
        return type(self), (self.problem, self.line, self.field, self.unit)


@dataclass
class Dataset:
    format: str
    """openai_chat, sharegpt, alpaca, prompt_completion, preference, openai_preference or flag_embedding."""
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
            found = _detect(record)
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
}


def _check_kind(fmt: _Format, expect: Kind | None) -> None:
    if expect is None or fmt.kind == expect:
        return
    raise DataFormatError(
        f"this is {_KIND_NAMES[fmt.kind][0]} but the job needs {_KIND_NAMES[expect][1]}; the file is {fmt.label}"
    )


def _detect(record: Any) -> _Format:
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {_json_type(record)}")
    for fmt in _FORMATS:
        if any(key in record for key in fmt.keys):
            return fmt
    if "prompt" in record:
        raise _invalid("completion", "is missing (or, for a preference pair, chosen and rejected)")
    keys = ", ".join(repr(key) for key in record) or "none"
    expected = ", ".join(fmt.label for fmt in _FORMATS)
    raise DataFormatError(f"no known fields (keys: {keys}); expected one of {expected}")


# --- fields ------------------------------------------------------------------------------------


def _invalid(path: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{path} {problem}", field=path)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return names[type(value)]


def _get(obj: dict[str, Any], path: str) -> Any:
    """The field at `path`, a path ending in the key of `obj` to read (e.g. "messages[0].role")."""
    key = path.rpartition(".")[2]
    if key not in obj:
        raise _invalid(path, "is missing")
    return obj[key]


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(path, f"must be an object, got {_json_type(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _invalid(path, f"must be a list, got {_json_type(value)}")
    if not value:
        raise _invalid(path, "is empty")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _invalid(path, f"must be a string, got {_json_type(value)}")
    return value


def _text(value: Any, path: str) -> str:
    text = _str(value, path)
    if not text.strip():
        raise _invalid(path, "is empty")
    return text


def _content(value: Any, path: str) -> str:
    """A string, or OpenAI content parts: text parts only, joined with newlines as vLLM does."""
    if isinstance(value, list):
        value = "\n".join(_text_part(part, f"{path}[{i}]") for i, part in enumerate(_list(value, path)))
    return _text(value, path)


def _text_part(value: Any, path: str) -> str:
    kind = _get(_object(value, path), f"{path}.type")
    if kind != "text":
        raise _invalid(f"{path}.type", f"must be 'text' (only text is supported), got {kind!r}")
    return _text(_get(value, f"{path}.text"), f"{path}.text")


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    role_key: str
    content_key: str
    roles: dict[str, Role]
    """The role names the dialect accepts, to the canonical role."""


_OPENAI = _Dialect("role", "content", {"system": "system", "user": "user", "assistant": "assistant"})
_SHAREGPT = _Dialect(
    "from", "value", {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
)


def _messages(value: Any, path: str, dialect: _Dialect, *, after: Role | None, last: Role) -> list[Message]:
    """Validate a list of messages that follows an `after` turn (None: it starts the conversation).

    Only a conversation's first message may be a system message; then user and assistant alternate,
    and the list must end with a `last` turn.
    """
    messages: list[Message] = []
    previous = after
    for i, item in enumerate(_list(value, path)):
        where = f"{path}[{i}]"
        message = _object(item, where)
        role_path = f"{where}.{dialect.role_key}"
        name = _str(_get(message, role_path), role_path)
        if name not in dialect.roles:
            allowed = ", ".join(repr(role) for role in dialect.roles)
            raise _invalid(role_path, f"must be one of {allowed}, got {name!r}")
        role = dialect.roles[name]
        _check_turn(role, name, previous, role_path, system_allowed=i == 0 and after is None)
        content_path = f"{where}.{dialect.content_key}"
        messages.append({"role": role, "content": _content(_get(message, content_path), content_path)})
        if role != "system":
            previous = role
    if messages[-1]["role"] != last:
        raise _invalid(
            path,
            f"must end with {'an' if last == 'assistant' else 'a'} {last!r} message, "
            f"but the last one is {messages[-1]['role']!r}",
        )
    return messages


def _check_turn(role: Role, name: str, previous: Role | None, path: str, system_allowed: bool) -> None:
    shown = repr(name) if name == role else f"{name!r} ({role})"
    if role == "system":
        if not system_allowed:
            raise _invalid(path, f"is {shown}, but only a conversation's first message may be a system one")
        return
    expected = "assistant" if previous == "user" else "user"
    if role != expected:
        context = f"after {previous!r}" if previous else "to start the conversation"
        raise _invalid(path, f"must be {expected!r} {context}, got {shown}")


def _turns(value: Any, path: str, *, after: Role | None, last: Role) -> list[Message]:
    """A string (one `last` message) or a list of OpenAI messages."""
    if isinstance(value, str):
        return [{"role": last, "content": _text(value, path)}]
    if isinstance(value, list):
        return _messages(value, path, _OPENAI, after=after, last=last)
    raise _invalid(path, f"must be a string or a list of messages, got {_json_type(value)}")


def _prompt(value: Any, path: str) -> list[Message]:
    return _turns(value, path, after=None, last="user")


def _reply(value: Any, path: str) -> list[Message]:
    return _turns(value, path, after="user", last="assistant")


# --- formats -----------------------------------------------------------------------------------


def _openai_chat(record: dict[str, Any]) -> Row:
    conversation = _messages(_get(record, "messages"), "messages", _OPENAI, after=None, last="assistant")
    return {"messages": conversation}


def _sharegpt(record: dict[str, Any]) -> Row:
    conversation = _messages(_get(record, "conversations"), "conversations", _SHAREGPT, after=None, last="assistant")
    return {"messages": conversation}


def _alpaca(record: dict[str, Any]) -> Row:
    instruction = _text(_get(record, "instruction"), "instruction")
    # null means no input: datasets exported with pandas or HF datasets often write it that way.
    extra = "" if record.get("input") is None else _str(record["input"], "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(_get(record, "output"), "output")},
        ]
    }


def _prompt_completion(record: dict[str, Any]) -> Row:
    return {"messages": _prompt(_get(record, "prompt"), "prompt") + _reply(_get(record, "completion"), "completion")}


def _preference(record: dict[str, Any]) -> Row:
    return {
        "prompt": _prompt(_get(record, "prompt"), "prompt"),
        "chosen": _reply(_get(record, "chosen"), "chosen"),
        "rejected": _reply(_get(record, "rejected"), "rejected"),
    }


def _openai_preference(record: dict[str, Any]) -> Row:
    prompt = _object(_get(record, "input"), "input")
    return {
        "prompt": _messages(_get(prompt, "input.messages"), "input.messages", _OPENAI, after=None, last="user"),
        "chosen": _messages(
            _get(record, "preferred_output"), "preferred_output", _OPENAI, after="user", last="assistant"
        ),
        "rejected": _messages(
            _get(record, "non_preferred_output"), "non_preferred_output", _OPENAI, after="user", last="assistant"
        ),
    }


def _passages(value: Any, path: str, *, required: bool) -> list[str]:
    if not isinstance(value, list):
        raise _invalid(path, f"must be a list of passages, got {_json_type(value)}")
    if required and not value:
        raise _invalid(path, "is empty")
    return [_text(passage, f"{path}[{i}]") for i, passage in enumerate(value)]


def _flag_embedding(record: dict[str, Any]) -> Row:
    query = _text(_get(record, "query"), "query")
    instruction = "" if record.get("prompt") is None else _str(record["prompt"], "prompt")
    return {
        "query": instruction + query,
        "pos": _passages(_get(record, "pos"), "pos", required=True),
        "neg": _passages(record.get("neg", []), "neg", required=False),
    }


@dataclass(frozen=True)
class _Format:
    name: str
    kind: Kind
    label: str
    keys: tuple[str, ...]
    """Any of these keys marks a record as this format (the first in _FORMATS wins)."""
    convert: Callable[[dict[str, Any]], Row]


_FORMATS = (
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
