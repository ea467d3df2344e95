"""multi: named sub-graders combined by a formula over their names."""

from __future__ import annotations

from typing import Any

from bentoservice.training.graders.base import Grader, GradeResult
from bentoservice.training.graders.formula import Formula


class MultiGrader(Grader):
    def __init__(self, name: str, param: str, graders: dict[str, Grader], calculate_output: str) -> None:
        super().__init__(name, param, {})
        self.graders = graders
        self.formula = Formula(calculate_output, set(graders), f"{param}.calculate_output")

    def references(self) -> set[str]:
        return set().union(*(grader.references() for grader in self.graders.values()))

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> GradeResult:
        scores = {name: grader.score(sample, item) for name, grader in self.graders.items()}
        return GradeResult(self.formula.evaluate(scores), scores)

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        return self.grade(sample, item).score
