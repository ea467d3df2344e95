"""OpenAI-compatible routes: models, chat completions, completions, chat templates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from bentoservice.api.errors import APIError, unknown_model
from bentoservice.api.schemas import (ChatCompletionRequest, CompletionRequest, SamplingFields,
                                      TemplateQuery, TemplateRegistration)
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


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    served = served_model(request)
    return {"object": "list", "data": _model_list(served, request.app.state.started)}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    served = served_model(request)
    for card in _model_list(served, request.app.state.started):
        if model_id in (card["id"], card["root"]) and (card["parent"] or model_id in (served.name, served.model_id)):
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


def _sse(stream: Stream, chunk: Callable[[str | None, str | None], dict[str, Any]], first: dict[str, Any] | None,
         include_usage: bool, usage_chunk: Callable[[dict[str, int]], dict[str, Any]]) -> EventSourceResponse:
    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield json.dumps(first)
            async for event in stream:
                if isinstance(event, Delta):
                    yield json.dumps(chunk(event.text, None))
                elif isinstance(event, Failed):
                    yield json.dumps({"error": {"message": event.message, "type": "server_error",
                                                "param": None, "code": "generation_failed"}})
                    break
                else:
                    yield json.dumps(chunk(None, event.reason))
                    if include_usage:
                        yield json.dumps(usage_chunk(_usage(event)))
            yield "[DONE]"
        finally:
            stream.cancel()  # a client that went away frees its slot at the next step

    return EventSourceResponse(events(), ping=15)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    served = served_model(request)
    choice = served.choose(body.model)
    prompt = served.encode_chat([m.plain() for m in body.messages])
    params = _params(body, served.max_tokens(len(prompt), body.completion_budget))
    stream = served.generate(prompt, params, choice)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None}
    if body.stream:
        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
            return {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage}

        first = {**meta, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        return _sse(stream, chunk, first, body.include_usage, usage_chunk)
    text, done = await _collect(stream)
    return {**meta, "object": "chat.completion", "usage": _usage(done), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
         "logprobs": None, "finish_reason": done.reason}]}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    served = served_model(request)
    choice = served.choose(body.model)
    if isinstance(body.prompt, str):
        prompt = served.encode_text(body.prompt)
    elif isinstance(body.prompt[0], str):
        prompt = served.encode_text(body.prompt[0])
    else:
        prompt = list(body.prompt)
    params = _params(body, served.max_tokens(len(prompt), body.max_tokens))
    stream = served.generate(prompt, params, choice)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None}
    if body.stream:
        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {**meta, "object": "text_completion",
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
            return {**meta, "object": "text_completion", "choices": [], "usage": usage}

        return _sse(stream, chunk, None, body.include_usage, usage_chunk)
    text, done = await _collect(stream)
    return {**meta, "object": "text_completion", "usage": _usage(done), "choices": [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}]}


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
