"""score_model: a served model (base or adapter) is prompted with the rendered input messages; the number in its
reply, clamped to `range`, is the score."""

from __future__ import annotations

import json
import re
from typing import Any

from bentoservice.training.graders import protocol
from bentoservice.training.graders.base import Grader
from bentoservice.training.graders.errors import GraderError, GradingFailed
from bentoservice.training.graders.models import ModelClient

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RESULT_KEYS = ("result", "score", "reward", "grade")


def parse_score(reply: str, low: float, high: float) -> float:
    """The score in a judge's reply: a JSON object's `result` (OpenAI's judges reply {"result": x, "steps": ...}),
    `score`, `reward` or `grade`, a bare JSON number, or else the first number in the text; clamped to [low, high]."""
    try:
        parsed = json.loads(reply)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        parsed = next((parsed[key] for key in _RESULT_KEYS if key in parsed), None)
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        number = float(parsed)
    else:
        match = _NUMBER.search(reply)
        if match is None:
            raise GradingFailed(
                f"the grader model's reply holds no number: {reply[:200]!r}", "model_grader_parse_error"
            )
        number = float(match.group(0))
    return min(high, max(low, number))


class ScoreModelGrader(Grader):
    def __init__(self, spec: protocol.ScoreModel, param: str, models: ModelClient | None) -> None:
        fields = {
            f"input.{i}.content.{j}": text
            for i, message in enumerate(spec.input)
            for j, text in enumerate(message.parts)
        }
        super().__init__(spec.name, param, fields)
        if models is None:
            raise GraderError(
                "score_model graders need the served models, and none are reachable here", f"{param}.model"
            )
        if models.has_model(spec.model) is False:
            raise GraderError(
                f"The model `{spec.model}` does not exist: score_model needs a model this service serves",
                f"{param}.model",
            )
        self.spec, self.models = spec, models
        self.sampling = self._sampling(spec.sampling_params or protocol.SamplingParams(), f"{param}.sampling_params")

    @staticmethod
    def _sampling(params: protocol.SamplingParams, param: str) -> dict[str, Any]:
        if params.reasoning_effort not in (None, "none"):
            raise GraderError(
                "reasoning_effort is not supported: the served models do not reason", f"{param}.reasoning_effort"
            )
        sampling = {
            "seed": params.seed,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_completions_tokens,
        }
        return {key: value for key, value in sampling.items() if value is not None}

    def score(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        messages = [
            {
                "role": "system" if message.role == "developer" else message.role,
                "content": "".join(
                    self.render(f"input.{i}.content.{j}", sample, item) for j in range(len(message.parts))
                ),
            }
            for i, message in enumerate(self.spec.input)
        ]
        reply = self.models.chat(self.spec.model, messages, **self.sampling)
        low, high = self.spec.range
        return parse_score(reply, low, high)
