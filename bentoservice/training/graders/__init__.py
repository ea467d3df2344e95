"""Graders for reinforcement fine-tuning and OpenAI's /v1/fine_tuning/alpha/graders: string_check, text_similarity,
score_model, python and multi, over OpenAI's grader objects. No torch in here (the API layer imports it)."""

from bentoservice.training.graders.base import Grader, GradeResult
from bentoservice.training.graders.build import build_grader
from bentoservice.training.graders.errors import GraderError, GradingFailed
from bentoservice.training.graders.models import ModelClient, ServiceModels
from bentoservice.training.graders.templates import sample_of

__all__ = [
    "GradeResult",
    "Grader",
    "GraderError",
    "GradingFailed",
    "ModelClient",
    "ServiceModels",
    "build_grader",
    "sample_of",
]
