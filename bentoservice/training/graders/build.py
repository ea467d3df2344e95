"""A grader object (OpenAI's shape, a dict) -> a Grader, checked: its fields, templates, models and formula."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from bentoservice.training.graders import protocol
from bentoservice.training.graders.base import Grader
from bentoservice.training.graders.errors import GraderError
from bentoservice.training.graders.models import ModelClient
from bentoservice.training.graders.multi import MultiGrader
from bentoservice.training.graders.score_model import ScoreModelGrader
from bentoservice.training.graders.similarity import TextSimilarityGrader
from bentoservice.training.graders.string_check import StringCheckGrader

_SPEC: TypeAdapter[protocol.Grader] = TypeAdapter(protocol.Grader)


def _param(loc: tuple[Any, ...], prefix: str) -> str:
    # pydantic puts the union's tag (the grader type) into the location: not a field.
    parts = [str(part) for part in loc if part not in protocol.TYPES and "[" not in str(part)]
    return ".".join([prefix, *parts])


def parse(spec: Any, param: str = "grader") -> protocol.Grader:
    try:
        return _SPEC.validate_python(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _param(tuple(first["loc"]), param)
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            given = (first.get("input") or {}).get("type") if isinstance(first.get("input"), dict) else None
            message = f"unknown grader type {given!r}" if given is not None else "a grader needs a `type`"
            raise GraderError(f"{message}; one of: {', '.join(protocol.TYPES)}", f"{where}.type") from None
        raise GraderError(f"{first['msg']} ({where})", where) from None


def _embedding_model() -> str | None:
    from bentoservice.config import get_settings

    names = get_settings().embedding_models
    return names[0] if names else None


def from_spec(spec: protocol.Grader, models: ModelClient | None, param: str = "grader") -> Grader:
    if isinstance(spec, protocol.StringCheck):
        return StringCheckGrader(spec, param)
    if isinstance(spec, protocol.TextSimilarity):
        return TextSimilarityGrader(spec, param, models, _embedding_model())
    if isinstance(spec, protocol.ScoreModel):
        return ScoreModelGrader(spec, param, models)
    if isinstance(spec, protocol.Python):
        from bentoservice.training.graders.python import PythonGrader

        return PythonGrader(spec, param)
    graders = {
        name: from_spec(
            sub, models, f"{param}.graders.{name}" if isinstance(spec.graders, dict) else f"{param}.graders"
        )
        for name, sub in spec.named.items()
    }
    return MultiGrader(spec.name, param, graders, spec.calculate_output)


def build_grader(spec: Any, models: ModelClient | None = None) -> Grader:
    """OpenAI's grader object, checked and ready to grade; raises GraderError(message, param)."""
    return from_spec(parse(spec), models)
