"""OpenAI's template references in grader strings: `{{sample.output_text}}`, `{{sample.output_json.x}}`,
`{{item.x}}` (dotted paths, a number indexes a list). Only these are replaced: no expressions are evaluated, so
a template cannot run code; anything else between double braces is an error."""

from __future__ import annotations

import json
import re
from typing import Any

from bentoservice.training.graders.errors import GraderError, GradingFailed

_BRACES = re.compile(r"\{\{(.*?)\}\}", re.S)
_PATH = re.compile(r"\s*(sample|item)((?:\.[A-Za-z0-9_\-]+)*)\s*")
_SAMPLE_FIELDS = ("output_text", "output_json")


def _paths(template: str, param: str) -> list[tuple[str, list[str]]]:
    found = []
    for match in _BRACES.finditer(template):
        path = _PATH.fullmatch(match.group(1))
        if path is None:
            raise GraderError(
                f"{param}: {match.group(0)!r} is not a reference; use {{{{sample.output_text}}}}, "
                "{{sample.output_json.FIELD}} or {{item.FIELD}}",
                param,
            )
        namespace, parts = path.group(1), [p for p in path.group(2).split(".") if p]
        if namespace == "sample" and (not parts or parts[0] not in _SAMPLE_FIELDS):
            raise GraderError(f"{param}: {match.group(0)!r}: `sample` has only {', '.join(_SAMPLE_FIELDS)}", param)
        if namespace == "item" and not parts:
            raise GraderError(f"{param}: {match.group(0)!r} names no field of the item", param)
        found.append((namespace, parts))
    return found


def references(template: str, param: str) -> set[str]:
    """The item fields (dotted paths after `item.`) a template reads; raises GraderError for a bad reference."""
    return {".".join(parts) for namespace, parts in _paths(template, param) if namespace == "item"}


def _lookup(value: Any, namespace: str, parts: list[str], param: str) -> Any:
    if namespace == "sample" and parts[0] == "output_json" and value.get("output_json") is None:
        raise GradingFailed(
            f"{param}: the sample is not JSON, so {{{{sample.output_json}}}} is unset", "sample_parse_error", param
        )
    for depth, part in enumerate(parts):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            where = ".".join([namespace, *parts[: depth + 1]])
            raise GradingFailed(f"{param}: {{{{{where}}}}} is missing", "invalid_variable_error", param)
    return value


def item_has(item: dict[str, Any], path: str) -> bool:
    """Whether `{{item.<path>}}` resolves in `item`, as rendering would resolve it."""
    try:
        _lookup(item, "item", path.split("."), "item")
    except GradingFailed:
        return False
    return True


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def render(template: str, sample: dict[str, Any], item: dict[str, Any], param: str) -> str:
    """The template with every reference replaced; a missing field raises GradingFailed naming it."""
    scopes = {"sample": sample, "item": item}

    def replace(match: re.Match[str]) -> str:
        ((namespace, parts),) = _paths(match.group(0), param)
        return _text(_lookup(scopes[namespace], namespace, parts, param))

    return _BRACES.sub(replace, template)


def sample_of(output_text: str) -> dict[str, Any]:
    """The `sample` namespace for a model's output: `output_json` is the output parsed when it is JSON."""
    try:
        output_json = json.loads(output_text)
    except ValueError:
        output_json = None
    return {"output_text": output_text, "output_json": output_json}
