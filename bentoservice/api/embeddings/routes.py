"""Embeddings (OpenAI's POST /v1/embeddings) and rerank (POST /v1/rerank, the shape Cohere, Jina and
TEI-fronting gateways share) from the embedding and rerank models the server loaded."""

from __future__ import annotations

import base64
import sys
import uuid
from array import array
from typing import TYPE_CHECKING, Any, Literal, cast

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from bentoservice.api.errors import APIError
from bentoservice.api.responses import Embeddings, ok
from bentoservice.engine.errors import AdapterError, ContextOverflow, UnknownModel

if TYPE_CHECKING:
    from bentoservice.engine.embeddings import Encoder, EncoderRegistry, Kind

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
MAX_DOCUMENTS = 1000


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None
    truncate: bool = False
    """TEI's option: cut inputs longer than the model takes instead of refusing them."""

    @field_validator("input")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must not be empty")
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("token ids are not accepted (they depend on a tokenizer); send the text")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
        if any(not text for text in texts):
            raise ValueError("input strings must not be empty")
        return value

    @property
    def texts(self) -> list[str]:
        # The validator lets only strings through.
        return [self.input] if isinstance(self.input, str) else cast("list[str]", list(self.input))


class Document(BaseModel):
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """The rerank model; the first one loaded when not given."""
    query: str = Field(min_length=1)
    documents: list[str | Document] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: int | None = Field(None, gt=0)
    return_documents: bool = True

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def _encoders(request: Request) -> EncoderRegistry:
    encoders = getattr(request.app.state, "encoders", None)
    if encoders is None:
        raise APIError(503, "the embedding and rerank models are still loading", None, "model_loading")
    return encoders


A_MODEL = {"embedding": "an embedding model", "rerank": "a rerank model"}


def _is_chat_model(request: Request, name: str) -> bool:
    served = getattr(request.app.state, "served", None)
    try:
        return served is not None and served.choose(name) is not None
    except (UnknownModel, AdapterError):  # AdapterError: a store model that is not an adapter (an encoder)
        return False


def _encoder(request: Request, name: str | None, kind: Kind) -> Encoder:
    """The `kind` model named, or that kind's default; a model of another kind is a 400, an unknown one a 404."""
    encoders = _encoders(request)
    found = encoders.default(kind) if name is None else encoders.find(name)
    if found is None and name is None:
        raise APIError(
            404,
            f"No {kind} model is loaded: start the server with --{kind}-model, or fine-tune one (General.task={kind})",
            "model",
            "model_not_found",
        )
    if found is None and name is not None and _is_chat_model(request, name):
        raise APIError(400, f"`{name}` is a chat model, not {A_MODEL[kind]}", "model", "invalid_model")
    if found is None:
        loaded = ", ".join(e.name for e in encoders.all() if e.kind == kind) or "none"
        raise APIError(
            404, f"The model `{name}` does not exist. Loaded {kind} models: {loaded}.", "model", "model_not_found"
        )
    if found.kind != kind:
        raise APIError(400, f"`{name}` is {A_MODEL[found.kind]}, not {A_MODEL[kind]}", "model", "invalid_model")
    return found


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    floats = array("f", vector)
    if sys.byteorder != "little":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


@router.post("/embeddings", responses=ok(Embeddings))
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    encoder = _encoder(request, body.model, "embedding")
    if body.dimensions is not None and body.dimensions != encoder.dimensions:
        raise APIError(
            400,
            f"{encoder.name} makes {encoder.dimensions}-dimensional embeddings; it cannot shorten "
            f"them to {body.dimensions}",
            "dimensions",
            "invalid_value",
        )
    try:
        vectors, tokens = await run_in_threadpool(encoder.embed, body.texts, body.truncate)
    except ContextOverflow as exc:
        raise APIError(400, str(exc), "input", "context_length_exceeded") from None
    data = [
        {"object": "embedding", "index": i, "embedding": _base64(v) if body.encoding_format == "base64" else v}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
    encoder = _encoder(request, body.model, "rerank")
    texts = body.texts
    scores, tokens = await run_in_threadpool(encoder.rerank, body.query, texts)
    ranked = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)[: body.top_n]
    results = [
        {
            "index": i,
            "relevance_score": scores[i],
            **({"document": {"text": texts[i]}} if body.return_documents else {}),
        }
        for i in ranked
    ]
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": encoder.name,
        "results": results,
        "usage": {"total_tokens": tokens},
        "meta": {"billed_units": {"search_units": 1}},
    }
