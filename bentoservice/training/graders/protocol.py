"""OpenAI's grader objects (the `grader` of a reinforcement job and of /v1/fine_tuning/alpha/graders/*) as pydantic
models. Unknown fields are refused, so nothing a client sends is silently dropped."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SOURCE_BYTES = 256 * 1024  # OpenAI's limit on a python grader's source


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class StringCheck(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


Metric = Literal[
    "cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Metric


class Python(_Grader):
    type: Literal["python"]
    source: str = Field(min_length=1, max_length=MAX_SOURCE_BYTES)
    image_tag: str | None = None
    """OpenAI's choice of sandbox image; here python graders run on the service's own interpreter."""


class Text(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Text | list[Text]
    type: Literal["message"] | None = None

    @property
    def parts(self) -> list[str]:
        if isinstance(self.content, str):
            return [self.content]
        return [part.text for part in (self.content if isinstance(self.content, list) else [self.content])]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_completions_tokens: int | None = Field(None, gt=0)
    reasoning_effort: str | None = None


class ScoreModel(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: SamplingParams | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ScoreModel:
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        return self


Single = Annotated[StringCheck | TextSimilarity | Python | ScoreModel, Field(discriminator="type")]


class Multi(_Grader):
    type: Literal["multi"]
    graders: dict[str, Single] | Single
    """OpenAI's docs give a dict of named graders; its SDK types one grader (named by its `name`): both work."""
    calculate_output: str = Field(min_length=1)

    @property
    def named(self) -> dict[str, Single]:
        return self.graders if isinstance(self.graders, dict) else {self.graders.name: self.graders}


Grader = Annotated[StringCheck | TextSimilarity | Python | ScoreModel | Multi, Field(discriminator="type")]
TYPES = ("string_check", "text_similarity", "score_model", "python", "multi")


class GraderBody(BaseModel):
    """The body of POST /v1/fine_tuning/alpha/graders/validate."""

    model_config = ConfigDict(extra="forbid")
    grader: Grader
