"""The graders' errors: a bad grader object (a 400 naming `param`) and a grade that could not be computed."""

from __future__ import annotations


class GraderError(ValueError):
    """A grader object, template or item that cannot be graded; `param` names the field (e.g. `grader.operation`)."""

    def __init__(self, message: str, param: str = "grader") -> None:
        super().__init__(message)
        self.message, self.param = message, param


class GradingFailed(GraderError):
    """A valid grader failed on one sample. `error` is the key of OpenAI's `metadata.errors` it sets
    (`python_grader_runtime_error`, `model_grader_parse_error`, ...)."""

    def __init__(self, message: str, error: str, param: str = "grader") -> None:
        super().__init__(message, param)
        self.error = error
