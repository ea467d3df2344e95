"""Adapter routes: OpenLLM's /v1/adapters (list, switch the default, load, unload) and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from bentoservice.api.completions.routes import served_model
from bentoservice.api.errors import APIError, unknown_adapter_message
from bentoservice.engine.errors import AdapterError, UnknownAdapter

if TYPE_CHECKING:
    from bentoservice.engine.served import ServedModel

router = APIRouter()


NAME_FORMS = "the served name, the model store tag (name or name:version) or its folder"


class DefaultAdapter(BaseModel):
    adapter_name: str | None = Field(
        description=f"the adapter requests naming the base use: {NAME_FORMS}; null for the bare base"
    )


class LoadAdapter(BaseModel):
    adapter_id: str = Field(
        min_length=1,
        description="a PEFT folder inside the allowed folders, a model store tag, a served name or a hub id",
    )
    adapter_name: str | None = Field(None, min_length=1)
    pinned: bool = Field(False, description="keep it in a slot: never evicted for another adapter")


class UnloadAdapter(BaseModel):
    adapter_name: str = Field(min_length=1, description=NAME_FORMS)


class LoadLora(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(
        min_length=1,
        description="a PEFT folder inside the allowed folders, a model store tag, a served name or a hub id",
    )
    pinned: bool = False


class UnloadLora(BaseModel):
    lora_name: str = Field(min_length=1, description=NAME_FORMS)


async def _adapter_call(param: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run an adapter change off the event loop; a name that resolves nowhere is a 404, a bad one a 400, both
    naming `param` and saying what is accepted."""
    try:
        return await run_in_threadpool(fn, *args)
    except UnknownAdapter as exc:
        raise APIError(404, unknown_adapter_message(str(exc.args[0])), param, "adapter_not_found") from None
    except AdapterError as exc:
        raise APIError(400, str(exc), param, "invalid_adapter") from None


def _listing(served: ServedModel) -> dict[str, Any]:
    """Adapters in a slot or in host memory (`tier`: gpu or cpu); /v1/models lists those on disk too."""
    entries = []
    for a in served.servable():
        if a.tier == "disk":
            continue
        entry = {"name": a.name, "source": a.source, "tier": a.tier, "default": a.name == served.default_adapter}
        if a.loaded is not None:
            entry.update(
                rank=a.loaded.rank,
                lora_alpha=a.loaded.alpha,
                target_modules=a.loaded.target_modules,
                pinned=a.loaded.pinned,
            )
        entries.append(entry)
    return {"object": "list", "base": served.name, "default": served.default_adapter, "data": entries}


@router.get("/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    return await run_in_threadpool(_listing, served_model(request))


@router.post("/adapters")
async def switch_default(body: DefaultAdapter, request: Request) -> dict[str, Any]:
    """Pick the adapter that requests naming the base model use (kept in a slot); null means the bare base."""
    served = served_model(request)
    try:
        await run_in_threadpool(served.set_default_adapter, body.adapter_name)
    except (UnknownAdapter, AdapterError) as exc:
        raise APIError(400, unknown_adapter_message(str(exc.args[0])), "adapter_name", "adapter_not_found") from None
    return await run_in_threadpool(_listing, served)


@router.post("/adapters/load")
async def load_adapter(body: LoadAdapter, request: Request) -> dict[str, Any]:
    served = served_model(request)
    await _adapter_call("adapter_id", served.load_adapter_from, body.adapter_id, body.adapter_name, True, body.pinned)
    return await run_in_threadpool(_listing, served)


@router.post("/adapters/unload")
async def unload_adapter(body: UnloadAdapter, request: Request) -> dict[str, Any]:
    served = served_model(request)
    await _adapter_call("adapter_name", served.unload_adapter, body.adapter_name)
    return await run_in_threadpool(_listing, served)


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora(body: LoadLora, request: Request) -> PlainTextResponse:
    served = served_model(request)
    await _adapter_call("lora_path", served.load_adapter_from, body.lora_path, body.lora_name, True, body.pinned)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora(body: UnloadLora, request: Request) -> PlainTextResponse:
    await _adapter_call("lora_name", served_model(request).unload_adapter, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
