"""The /v1 OpenAPI document with the error answers each route really gives (OpenAI's envelope), in place of
FastAPI's 422, which this API never sends (validation errors are 400s)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bentoservice.api.guard import required_role
from bentoservice.config import get_settings

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_WHY = {
    400: "Bad request (the field in `param`)",
    401: "No or unknown API key",
    403: "An inference key on an admin route",
    404: "Unknown model, job, file or adapter",
    409: "Conflict with the resource's state",
    413: "Body over the size limit ({limit})",
    429: "Too many requests in flight",
    503: "Still loading",
}
_GENERATES = ("/chat/completions", "/completions", "/embeddings", "/rerank")


def _errors(method: str, path: str) -> list[int]:
    codes = [400, 401, 404, 413, 503]
    if required_role(method.upper(), f"/v1{path}") == "admin":
        codes.append(403)
    if path.startswith(_GENERATES):
        codes.append(429)
    return sorted(codes)


def _body_limit(path: str) -> str:
    settings = get_settings()
    if path == "/files":
        return f"{settings.max_file_bytes} bytes, BENTOSERVICE_MAX_FILE_BYTES"
    return f"{settings.max_request_bytes} bytes, BENTOSERVICE_MAX_REQUEST_BYTES"


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for code in _errors(method, path):
                        responses[str(code)] = {
                            "description": _WHY[code].format(limit=_body_limit(path)),
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        }
            schema["components"]["schemas"].pop("HTTPValidationError", None)
            schema["components"]["schemas"].pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
