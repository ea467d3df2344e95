"""The bodies of OpenAI's grader endpoints; the grader object itself is checked by training.graders."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]


class RunBody(ValidateBody):
    model_sample: str
    """The sampled output: `sample.output_text`, and `sample.output_json` when it is JSON."""
    item: Any = None
    """The training line's fields: the `item` namespace."""
