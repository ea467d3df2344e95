"""The small checks every training format's converter shares: each names the field path it checks, so that an
error says which field of which line is wrong."""

from __future__ import annotations

from typing import Any, Literal

Unit = Literal["line", "record"]


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


def invalid(path: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{path} {problem}", field=path)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return names[type(value)]


def get(obj: dict[str, Any], path: str) -> Any:
    """The field at `path`, a path ending in the key of `obj` to read (e.g. "messages[0].role")."""
    key = path.rpartition(".")[2]
    if key not in obj:
        raise invalid(path, "is missing")
    return obj[key]


def an_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(path, f"must be an object, got {json_type(value)}")
    return value


def a_list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(path, f"must be a list, got {json_type(value)}")
    if not value:
        raise invalid(path, "is empty")
    return value


def a_string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise invalid(path, f"must be a string, got {json_type(value)}")
    return value


def nonempty_text(value: Any, path: str) -> str:
    text = a_string(value, path)
    if not text.strip():
        raise invalid(path, "is empty")
    return text


def message_content(value: Any, path: str) -> str:
    """A string, or OpenAI content parts: text parts only, joined with newlines as vLLM does."""
    if isinstance(value, list):
        value = "\n".join(text_part(part, f"{path}[{i}]") for i, part in enumerate(a_list(value, path)))
    return nonempty_text(value, path)


def text_part(value: Any, path: str) -> str:
    kind = get(an_object(value, path), f"{path}.type")
    if kind != "text":
        raise invalid(f"{path}.type", f"must be 'text' (only text is supported), got {kind!r}")
    return nonempty_text(get(value, f"{path}.text"), f"{path}.text")
