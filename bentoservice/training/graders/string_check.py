"""string_check: 1.0 when the rendered input and reference compare as `operation` says, else 0.0."""

from __future__ import annotations

from typing import Any

from bentoservice.training.graders import protocol
from bentoservice.training.graders.base import Grader

_OPERATIONS = {
    "eq": lambda text, reference: text == reference,
    "ne": lambda text, reference: text != reference,
    "like": lambda text, reference: reference in text,
    "ilike": lambda text, reference: reference.lower() in text.lower(),
}


class StringCheckGrader(Grader):
    def __init__(self, spec: protocol.StringCheck, param: str) -> None:
        super().__init__(spec.name, param, {"input": spec.input, "reference": spec.reference})
        self.operation = _OPERATIONS[spec.operation]

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        text, reference = self.render("input", sample, item), self.render("reference", sample, item)
        return 1.0 if self.operation(text, reference) else 0.0
