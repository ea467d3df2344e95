"""What a successful answer holds, as the OpenAPI document declares it: OpenAI's own SDK types, widened where this
service answers more than OpenAI does (a job's `paused` status, trackio integrations, its file purposes), and
OpenAI's list object around them. Declarations only (route decorators' `responses`): the routes build their bodies
themselves, and tests/e2e/test_fuzz.py checks every answer against these."""

from __future__ import annotations

from typing import Any, Literal

from openai.types import CreateEmbeddingResponse, Embedding, FileDeleted, FileObject, Model
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.alpha import GraderRunResponse, GraderValidateResponse
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from pydantic import BaseModel, ConfigDict, create_model

__all__ = [
    "ChatCompletion",
    "Completion",
    "Embeddings",
    "FileDeleted",
    "File",
    "FineTuningJobCheckpoint",
    "JobEvent",
    "GraderRunResponse",
    "GraderValidateResponse",
    "Job",
    "Model",
    "listing",
    "ok",
]


class Integration(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["wandb", "trackio"]


class Job(FineTuningJob):
    """OpenAI's job object; `paused` (POST .../pause) among its statuses, trackio among its integrations."""

    status: Literal[  # type: ignore[assignment]
        "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"
    ]
    integrations: list[Integration] | None = None  # type: ignore[assignment]


class JobEvent(FineTuningJobEvent):
    """OpenAI's job event; `checkpoint` events too (a checkpoint saved: its step and path in `data`)."""

    type: Literal["message", "metrics", "checkpoint"] | None = None  # type: ignore[assignment]


class File(FileObject):
    """OpenAI's file object; `conversations` and `preference` say what an upload holds (docs/fine-tuning.md)."""

    purpose: Literal["fine-tune", "conversations", "preference"]  # type: ignore[assignment]


class EmbeddingItem(Embedding):
    """OpenAI's embedding; a base64 string with `encoding_format: base64`, as OpenAI answers then."""

    embedding: list[float] | str  # type: ignore[assignment]


class Embeddings(CreateEmbeddingResponse):
    data: list[EmbeddingItem]  # type: ignore[assignment]


def listing(item: type[BaseModel], has_more: bool = True) -> type[BaseModel]:
    """OpenAI's list object of `item`s (`has_more` where the route pages)."""
    fields: dict[str, Any] = {"object": (Literal["list"], ...), "data": (list[item], ...)}  # type: ignore[valid-type]
    if has_more:
        fields["has_more"] = (bool, ...)
    return create_model(f"{item.__name__}List", __config__=ConfigDict(extra="allow"), **fields)


def ok(model: type[BaseModel], stream: str | None = None) -> dict[int | str, dict[str, Any]]:
    """A route's `responses` for its 200: `model` as JSON, and server-sent events of `stream` objects (as JSON in
    each event's `data`, the last one `[DONE]`) where the route streams."""
    if stream is None:
        return {200: {"model": model}}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "description": f"a {stream} object as JSON; the last: [DONE]"}},
    }
    return {200: {"model": model, "content": {"text/event-stream": {"schema": event}}}}
