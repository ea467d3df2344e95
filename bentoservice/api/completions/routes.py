"""OpenAI-compatible routes: models, chat completions, completions, chat templates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from bentoservice.api.completions.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    TemplateQuery,
    TemplateRegistration,
)
from bentoservice.api.errors import APIError, unknown_model
from bentoservice.engine.params import Delta, Failed, Finished, SamplingParams
from bentoservice.engine.templates import chat_templates, register_chat_template

if TYPE_CHECKING:
    from bentoservice.engine.scheduler import Stream
    from bentoservice.engine.served import ServedModel

router = APIRouter()


def served_model(request: Request) -> ServedModel:
    served = getattr(request.app.state, "served", None)
    if served is None:
        raise APIError(503, "the model is still loading", None, "model_loading")
    return served


def _model_card(model_id: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "bentoservice",
            "root": root, "parent": parent}


def _model_list(served: ServedModel, created: int) -> list[dict[str, Any]]:
    cards = [_model_card(served.name, served.model_id, None, created)]
    cards += [_model_card(a.name, a.source, served.name, created) for a in served.adapters.values()]
    return cards


def _encoder_cards(request: Request, created: int) -> list[dict[str, Any]]:
    """The embedding and rerank models (see api/embeddings.py); a fine-tune's parent is the model it started from."""
    encoders = getattr(request.app.state, "encoders", None)
    return [_model_card(e.name, e.source, e.parent, created) for e in (encoders.all() if encoders else [])]


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    served = served_model(request)
    created = request.app.state.started
    return {"object": "list", "data": _model_list(served, created) + _encoder_cards(request, created)}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    served = served_model(request)
    for card in _model_list(served, request.app.state.started):
        if model_id in (card["id"], card["root"]) and (card["parent"] or model_id in (served.name, served.model_id)):
            return card
    for card in _encoder_cards(request, request.app.state.started):
        if model_id in (card["id"], card["root"]):
            return card
    raise unknown_model(model_id)


def _params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=body.stops)


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _collect(stream: Stream) -> tuple[str, Finished]:
    parts: list[str] = []
    try:
        async for event in stream:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise APIError(500, event.message, None, "generation_failed")
            else:
                return "".join(parts), event
    finally:
        stream.cancel()
    raise APIError(500, "generation ended without a result")


@dataclass(frozen=True)
class Shape:
    """How chat and text completions differ on the wire."""

    id_prefix: str
    object: str
    chunk_object: str
    text_part: Callable[[str | None], dict[str, Any]]
    """The choice's text: in full, or (None) the empty delta of the last chunk."""
    full_part: Callable[[str], dict[str, Any]]
    first_delta: dict[str, Any] | None = None


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk",
             lambda text: {"delta": {} if text is None else {"content": text}},
             lambda text: {"message": {"role": "assistant", "content": text, "refusal": None}},
             {"delta": {"role": "assistant", "content": ""}})
TEXT = Shape("cmpl", "text_completion", "text_completion", lambda text: {"text": text or ""},
             lambda text: {"text": text})


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def _events(stream: Stream, meta: dict[str, Any], shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events, framed here (`data: ...` and a blank line, as OpenAI and vLLM send
    them): a plain streaming response costs the event loop about a tenth less per token than an SSE
    library's, which wraps every send in a timeout scope."""
    def chunk(part: dict[str, Any], finish: str | None) -> str:
        return sse(json.dumps({**meta, "object": shape.chunk_object,
                               "choices": [{"index": 0, **part, "logprobs": None, "finish_reason": finish}]}))

    async def events() -> AsyncIterator[str]:
        try:
            if shape.first_delta is not None:
                yield chunk(shape.first_delta, None)
            async for event in stream:
                if isinstance(event, Delta):
                    yield chunk(shape.text_part(event.text), None)
                elif isinstance(event, Failed):
                    yield sse(json.dumps({"error": {"message": event.message, "type": "server_error",
                                                    "param": None, "code": "generation_failed"}}))
                    break
                else:
                    yield chunk(shape.text_part(None), event.reason)
                    if include_usage:
                        yield sse(json.dumps({**meta, "object": shape.chunk_object, "choices": [],
                                              "usage": _usage(event)}))
            yield sse("[DONE]")
        finally:
            stream.cancel()  # a client that went away frees its slot at the next step

    return events()


async def _respond(served: ServedModel, body: SamplingFields, prompt: list[int], budget: int | None,
                   shape: Shape) -> Any:
    params = _params(body, served.max_tokens(len(prompt), budget))
    stream = served.generate(prompt, params, served.choose(body.model))
    meta = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None}
    if body.stream:
        return StreamingResponse(_events(stream, meta, shape, body.include_usage), media_type="text/event-stream")
    text, done = await _collect(stream)
    return {**meta, "object": shape.object, "usage": _usage(done), "choices": [
        {"index": 0, **shape.full_part(text), "logprobs": None, "finish_reason": done.reason}]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    served = served_model(request)
    served.choose(body.model)  # an unknown model is a 404 before any work
    prompt = served.encode_chat([m.plain() for m in body.messages])
    return await _respond(served, body, prompt, body.completion_budget, CHAT)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    served = served_model(request)
    served.choose(body.model)
    if isinstance(body.prompt, str):
        prompt = served.encode_text(body.prompt)
    elif isinstance(body.prompt[0], str):
        prompt = served.encode_text(body.prompt[0])
    else:
        prompt = list(body.prompt)
    return await _respond(served, body, prompt, body.max_tokens, TEXT)


@router.get("/chat_templates")
async def list_chat_templates(request: Request) -> dict[str, Any]:
    served = served_model(request)
    return {"object": "list", "model_template": {"model": served.name, "name": served.template_name},
            "data": [{"name": name, "template": text} for name, text in sorted(chat_templates().items())]}


@router.post("/chat_templates")
async def add_chat_template(body: TemplateRegistration) -> dict[str, Any]:
    register_chat_template(body.name, body.template, override=body.override)
    return {"name": body.name, "template": body.template, "registered": True}


@router.post("/worker_get_conversation_template")
async def conversation_template(body: TemplateQuery, request: Request) -> dict[str, Any]:
    """FastChat's check of the template in use, for the model named (or the served one)."""
    served = served_model(request)
    if body.model is not None:
        served.choose(body.model)
    return {"conv": {"name": served.template_name, "template": served.template,
                     "example": served.render_chat([{"role": "user", "content": "Hello!"}])}}
