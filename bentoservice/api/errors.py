"""OpenAI's error envelope for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bentoservice.engine.errors import AdapterError, ContextOverflow, Overloaded, UnknownAdapter, UnknownModel
from bentoservice.engine.templates import TemplateError, TemplateExists
from bentoservice.store.adapters import ACCEPTED_FORMS

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body streams in past its limit (api.guard); an HTTPException so FastAPI lets it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error")


def envelope(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def unknown_model(name: str, param: str = "model") -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist. A model is the base model, `<base>:base`, or an "
        f"adapter: {ACCEPTED_FORMS}.",
        param,
        "model_not_found",
    )


def unknown_adapter_message(detail: str) -> str:
    """The resolver's message says the accepted forms already; a bare name gets them here."""
    return detail if "accepted:" in detail else f"No adapter `{detail}` is served; accepted: {ACCEPTED_FORMS}."


def _from_engine(exc: Exception) -> APIError:
    if isinstance(exc, UnknownModel):
        return unknown_model(str(exc.args[0]))
    if isinstance(exc, UnknownAdapter):
        return APIError(404, unknown_adapter_message(str(exc.args[0])), "adapter_name", "adapter_not_found")
    if isinstance(exc, ContextOverflow):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, Overloaded):
        return APIError(429, str(exc), None, "server_overloaded")
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), "lora_path", "invalid_adapter")
    if isinstance(exc, TemplateExists):
        return APIError(409, str(exc), "name", "template_exists")
    if isinstance(exc, TemplateError):
        return APIError(400, str(exc), "template", "invalid_template")
    raise exc


# pydantic names the branch of a union that failed (`str`, `function-after[...]`, `list[int]`): not a field.
_BRANCH = re.compile(r"(str|int|float|bool|list|dict|constrained-[a-z]+|literal\[.*\]|[a-z-]+\[.*\])")


def _location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and not _BRANCH.fullmatch(str(p))]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return envelope(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = _location(tuple(first.get("loc", ())))
        where = f" ({param})" if param else ""
        return envelope(400, f"{first.get('msg', 'invalid request')}{where}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        code = "request_too_large" if isinstance(exc, BodyTooLarge) else None
        return envelope(exc.status_code, message, None, code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return envelope(500, f"internal error: {exc.__class__.__name__}", None, "internal_error")

    for kind in (UnknownModel, UnknownAdapter, ContextOverflow, Overloaded, AdapterError, TemplateError):
        app.add_exception_handler(kind, _engine_error)


async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    error = _from_engine(exc)
    return envelope(error.status, error.message, error.param, error.code)
