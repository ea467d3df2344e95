"""The /v1 OpenAPI document with the error answers each route really gives (OpenAI's envelope), in place of
FastAPI's 422, which this API never sends (validation errors are 400s)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bentoservice.api.guard import required_role
from bentoservice.config import get_settings

# Named apart from OpenAI's own `Error` (a job's `error` field), which the job schema refers to.
_ENVELOPE = "ErrorEnvelope"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_WHY = {
    400: "Bad request (the field in `param`)",
    401: "No or unknown API key",
    403: "An inference key on an admin route",
    404: "Unknown model, job, file or adapter",
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
    limit, setting = get_settings().body_limit(f"/v1{path}")
    return f"{limit} bytes, {setting}"


def _bound_body(operation: dict[str, Any], path: str) -> None:
    """JSON Schema has no bound on a body's bytes: the request body states it (`x-max-bytes`, and in words)."""
    body = operation.get("requestBody")
    if body is not None:
        limit, setting = get_settings().body_limit(f"/v1{path}")
        body["x-max-bytes"] = limit
        body["description"] = f"At most {limit} bytes ({setting}); more is a 413."


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})[_ENVELOPE] = _ERROR
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    _bound_body(operation, path)
                    # The route's own errors (its decorator's `responses`: a 409 where it has a conflict), then
                    # those every route of its kind gives.
                    own = {int(c): r["description"] for c, r in responses.items() if c.startswith("4")}
                    for code in sorted(own.keys() | set(_errors(method, path))):
                        responses[str(code)] = {
                            "description": own.get(code) or _WHY[code].format(limit=_body_limit(path)),
                            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{_ENVELOPE}"}}},
                        }
            schema["components"]["schemas"].pop("HTTPValidationError", None)
            schema["components"]["schemas"].pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
