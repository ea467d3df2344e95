"""What every grader is: a name, the templates it renders, and `grade(sample, item)`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from bentoservice.training.graders import templates


@dataclass
class GradeResult:
    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)
    """One score per named sub-grader of a multi grader; {name: score} for the others."""


class Grader(ABC):
    def __init__(self, name: str, param: str, template_fields: dict[str, str]) -> None:
        """`template_fields`: field name -> template, each checked here (a bad reference is a GraderError)."""
        self.name, self.param = name, param
        self._templates = {f"{param}.{key}": text for key, text in template_fields.items()}
        self._references = set().union(*(templates.references(t, p) for p, t in self._templates.items()))

    def references(self) -> set[str]:
        """The item fields (dotted paths after `item.`) the templates read."""
        return set(self._references)

    def render(self, key: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
        where = f"{self.param}.{key}"
        return templates.render(self._templates[where], sample, item, where)

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> GradeResult:
        score = self.score(sample, item)
        return GradeResult(score, {self.name: score})

    @abstractmethod
    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float: ...
