"""Adapter routes: OpenLLM's /v1/adapters (list, switch the default, load, unload) and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from bentoservice.api.completions.routes import served_model
from bentoservice.api.errors import APIError
from bentoservice.engine.errors import AdapterError, UnknownAdapter

router = APIRouter()


class DefaultAdapter(BaseModel):
    adapter_name: str | None


class LoadAdapter(BaseModel):
    adapter_id: str = Field(min_length=1, description="a PEFT folder, a model store tag or a hub id")
    adapter_name: str | None = Field(None, min_length=1)


class UnloadAdapter(BaseModel):
    adapter_name: str = Field(min_length=1)


class LoadLora(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLora(BaseModel):
    lora_name: str = Field(min_length=1)


async def _load(request: Request, src: str, name: str | None, param: str) -> None:
    try:
        await run_in_threadpool(served_model(request).load_adapter_from, src, name, True)
    except AdapterError as exc:
        raise APIError(400, str(exc), param, "invalid_adapter") from None


def _listing(request: Request) -> dict[str, Any]:
    served = served_model(request)
    return {"object": "list", "base": served.name, "default": served.default_adapter, "data": [
        {"name": a.name, "source": a.source, "rank": a.rank, "lora_alpha": a.alpha,
         "target_modules": a.target_modules, "default": a.name == served.default_adapter}
        for a in served.adapters.values()]}


@router.get("/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    return _listing(request)


@router.post("/adapters")
async def switch_default(body: DefaultAdapter, request: Request) -> dict[str, Any]:
    """Pick the adapter that requests naming the base model use; null means the bare base."""
    served = served_model(request)
    try:
        await run_in_threadpool(served.set_default_adapter, body.adapter_name)
    except UnknownAdapter:
        raise APIError(400, f"No adapter named `{body.adapter_name}` is loaded; loaded: "
                            f"{', '.join(served.adapters) or 'none'}.", "adapter_name", "adapter_not_found") from None
    return _listing(request)


@router.post("/adapters/load")
async def load_adapter(body: LoadAdapter, request: Request) -> dict[str, Any]:
    await _load(request, body.adapter_id, body.adapter_name, "adapter_id")
    return _listing(request)


@router.post("/adapters/unload")
async def unload_adapter(body: UnloadAdapter, request: Request) -> dict[str, Any]:
    await run_in_threadpool(served_model(request).unload_adapter, body.adapter_name)
    return _listing(request)


@router.post("/load_lora_adapter")
async def load_lora(body: LoadLora, request: Request) -> PlainTextResponse:
    await _load(request, body.lora_path, body.lora_name, "lora_path")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora(body: UnloadLora, request: Request) -> PlainTextResponse:
    await run_in_threadpool(served_model(request).unload_adapter, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
