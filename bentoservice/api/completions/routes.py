"""OpenAI-compatible routes: models, chat completions, completions, chat templates."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from bentoservice.api.completions import tools
from bentoservice.api.completions.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TemplateQuery,
    TemplateRegistration,
)
from bentoservice.api.completions.sampling import choices_of, request_params
from bentoservice.api.completions.shapes import CHAT, TEXT, Shape
from bentoservice.api.completions.tools import ToolReply
from bentoservice.api.errors import APIError, error_type, unknown_model
from bentoservice.api.responses import ChatCompletion, Completion, Model, listing, ok
from bentoservice.engine.errors import AdapterError, UnknownModel
from bentoservice.engine.params import Delta, Event, Failed, Finished, TokenLogprob
from bentoservice.engine.templates import chat_templates, register_chat_template

if TYPE_CHECKING:
    from bentoservice.engine.scheduler import Stream
    from bentoservice.engine.served import Choice, ServedModel

router = APIRouter()


def served_model(request: Request) -> ServedModel:
    served = getattr(request.app.state, "served", None)
    if served is None:
        raise APIError(503, "the model is still loading", None, "model_loading")
    return served


def _model_card(model_id: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "bentoservice",
        "root": root,
        "parent": parent,
    }


def _model_list(served: ServedModel, created: int) -> list[dict[str, Any]]:
    """The base and every adapter it can serve, loaded or not; `tier` (an extension) says where each adapter is."""
    cards = [_model_card(served.name, served.model_id, None, created)]
    cards += [{**_model_card(a.name, a.source, served.name, created), "tier": a.tier} for a in served.servable()]
    return cards


def _encoder_cards(request: Request, created: int) -> list[dict[str, Any]]:
    """The embedding and rerank models (see api/embeddings.py); a fine-tune's parent is the model it started from."""
    encoders = getattr(request.app.state, "encoders", None)
    return [_model_card(e.name, e.source, e.parent, created) for e in (encoders.all() if encoders else [])]


@router.get("/models", responses=ok(listing(Model, has_more=False)))
async def list_models(request: Request) -> dict[str, Any]:
    served = served_model(request)
    created = request.app.state.started
    listed = await run_in_threadpool(_model_list, served, created)  # reads the store and the adapter folders
    return {"object": "list", "data": listed + _encoder_cards(request, created)}


@router.get("/models/{model_id:path}", responses=ok(Model))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    served = served_model(request)
    for card in await run_in_threadpool(_model_list, served, request.app.state.started):
        if model_id in (card["id"], card["root"]) and (card["parent"] or model_id in (served.name, served.model_id)):
            return card
    for card in _encoder_cards(request, request.app.state.started):
        if model_id in (card["id"], card["root"]):
            return card
    raise unknown_model(model_id)


def _usage(done: list[Finished]) -> dict[str, int]:
    completion = sum(d.completion_tokens for d in done)
    return {
        "prompt_tokens": done[0].prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": done[0].prompt_tokens + completion,
    }


async def _collect(stream: Stream) -> tuple[str, list[TokenLogprob], Finished]:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async for event in stream:
            if isinstance(event, Delta):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, Failed):
                raise APIError(event.status, event.message, None, event.code)
            else:
                return "".join(parts), logprobs, event
    finally:
        stream.cancel()
    raise APIError(500, "generation ended without a result")


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several streams as they come, each with its stream's index."""
    if len(streams) == 1:  # the common case, without a task per stream
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        async for event in stream:
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, event = await queue.get()
            open_streams -= not isinstance(event, Delta)
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def sse(data: str) -> str:
    return f"data: {data}\n\n"


@dataclass(frozen=True)
class Reply:
    """What one request's response is made of, beside the engine's streams."""

    served: ServedModel
    shape: Shape
    meta: dict[str, Any]
    logprobs: bool
    echo: str = ""
    """Text that opens every choice (completions' `echo`: the prompt)."""
    tools: ToolReply | None = None
    """How tool calls are read out of the text; None: the text is the reply."""


def _events(streams: list[Stream], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events, framed here (`data: ...` and a blank line, as OpenAI and vLLM send
    them): a plain streaming response costs the event loop about a tenth less per token than an SSE
    library's, which wraps every send in a timeout scope."""
    shape, meta = reply.shape, reply.meta
    offsets = [len(reply.echo)] * len(streams)
    readers = [reply.tools.reader() if reply.tools else None for _ in streams]

    def chunk(index: int, part: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
        return sse(
            json.dumps(
                {
                    **meta,
                    "object": shape.chunk_object,
                    "choices": [{"index": index, **part, "logprobs": logprobs, "finish_reason": finish}],
                }
            )
        )

    async def events() -> AsyncIterator[str]:
        done: list[Finished] = []
        try:
            for index in range(len(streams)):
                if shape.first_delta is not None:
                    yield chunk(index, shape.first_delta, None)
                if reply.echo:
                    yield chunk(index, shape.text_part(reply.echo), None)
            async for index, event in _merged(streams):
                if isinstance(event, Delta):
                    logprobs = None
                    if reply.logprobs:
                        logprobs = shape.logprobs(reply.served, list(event.logprobs), offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs.get("tokens", ()))
                    reader = readers[index]
                    parts = reader.feed(event.text) if reader else [shape.text_part(event.text)]
                    for part in parts or ([{"delta": {}}] if logprobs else []):  # text held back keeps its logprobs
                        yield chunk(index, part, None, logprobs)
                        logprobs = None
                elif isinstance(event, Failed):
                    yield sse(
                        json.dumps(
                            {
                                "error": {
                                    "message": event.message,
                                    "type": error_type(event.status),
                                    "param": None,
                                    "code": event.code,
                                }
                            }
                        )
                    )
                    break
                else:
                    done.append(event)
                    reader = readers[index]
                    parts, reason = reader.finish(event.reason) if reader else ([], event.reason)
                    for part in parts:
                        yield chunk(index, part, None)
                    yield chunk(index, shape.text_part(None), reason)
            if include_usage and len(done) == len(streams):
                yield sse(json.dumps({**meta, "object": shape.chunk_object, "choices": [], "usage": _usage(done)}))
            yield sse("[DONE]")
        finally:
            for stream in streams:
                stream.cancel()  # a client that went away frees its slot at the next step

    return events()


async def choose(served: ServedModel, body: ChatCompletionRequest | CompletionRequest) -> Choice:
    """What the request names (an unknown model is a 404 before any work); a name not seen before is looked up
    off the event loop."""
    if body.adapter_id is not None:
        served.choose(body.model)  # the base, or an adapter that adapter_id then replaces
    model, param = (body.adapter_id, "adapter_id") if body.adapter_id is not None else (body.model, "model")
    try:
        return served.choose(model) if served.knows(model) else await run_in_threadpool(served.choose, model)
    except AdapterError as exc:  # an unsafe id, an adapter for another base
        raise APIError(400, str(exc), param, "invalid_adapter") from None
    except UnknownModel:
        raise unknown_model(model, param) from None


async def _respond(
    served: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    budget: int | None,
    shape: Shape,
    choice: Choice,
    echo: str = "",
    calls: ToolReply | None = None,
) -> Any:
    params = await request_params(body, served, served.max_tokens(len(prompt), budget))
    streams = served.generate_choices(prompt, choices_of(params, body.n), choice)
    meta = {
        "id": f"{shape.id_prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    reply = Reply(served, shape, meta, params.logprobs is not None, echo, calls)
    if body.stream:
        return StreamingResponse(_events(streams, reply, body.include_usage), media_type="text/event-stream")
    try:
        results = await asyncio.gather(*map(_collect, streams))
    finally:
        for stream in streams:
            stream.cancel()
    choices = []
    for i, (text, logprobs, done) in enumerate(results):
        part, reason = (calls and calls.message(text, done.reason)) or (shape.full_part(echo + text), done.reason)
        lp = shape.logprobs(served, logprobs, len(echo)) if reply.logprobs else None
        choices.append({"index": i, **part, "logprobs": lp, "finish_reason": reason})
    return {**meta, "object": shape.object, "usage": _usage([done for _, _, done in results]), "choices": choices}


@router.post("/chat/completions", responses=ok(ChatCompletion, stream="chat.completion.chunk"))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    served = served_model(request)
    choice = await choose(served, body)
    tools.check(body, served)
    prompt = served.encode_chat([m.plain() for m in body.messages], tools.definitions(body))
    return await _respond(served, body, prompt, body.completion_budget, CHAT, choice, calls=tools.reply(body, served))


@router.post("/completions", responses=ok(Completion, stream="text_completion"))
async def completions(body: CompletionRequest, request: Request) -> Any:
    served = served_model(request)
    choice = await choose(served, body)
    if isinstance(body.prompt, str):
        prompt = served.encode_text(body.prompt)
    elif isinstance(body.prompt[0], str):
        prompt = served.encode_text(body.prompt[0])
    else:
        prompt = list(body.prompt)
        if max(prompt) >= served.vocab_size:
            raise APIError(
                400,
                f"token id {max(prompt)} is outside the vocabulary (0..{served.vocab_size - 1})",
                "prompt",
                "invalid_value",
            )
    echo = ""
    if body.echo:
        echo = (
            served.decode(prompt)
            if isinstance(body.prompt[0], int)
            else str(body.prompt)
            if isinstance(body.prompt, str)
            else body.prompt[0]
        )
    return await _respond(served, body, prompt, body.max_tokens, TEXT, choice, echo)


@router.get("/chat_templates")
async def list_chat_templates(request: Request) -> dict[str, Any]:
    served = served_model(request)
    return {
        "object": "list",
        "model_template": {"model": served.name, "name": served.template_name},
        "data": [{"name": name, "template": text} for name, text in sorted(chat_templates().items())],
    }


@router.post("/chat_templates", responses={409: {"description": "A template of that name exists (no override)"}})
async def add_chat_template(body: TemplateRegistration) -> dict[str, Any]:
    # Its trial render may take up to its time limit: off the event loop.
    await run_in_threadpool(register_chat_template, body.name, body.template, body.override)
    return {"name": body.name, "template": body.template, "registered": True}


@router.post("/worker_get_conversation_template")
async def conversation_template(body: TemplateQuery, request: Request) -> dict[str, Any]:
    """FastChat's check of the template in use, for the model named (or the served one)."""
    served = served_model(request)
    if body.model is not None:
        served.choose(body.model)
    return {
        "conv": {
            "name": served.template_name,
            "template": served.template,
            "example": served.render_chat([{"role": "user", "content": "Hello!"}]),
        }
    }
