"""The API keys and body size checks every route goes through (api.guard.Guard), on requests built by hand."""

from __future__ import annotations

import asyncio
import json

from starlette.datastructures import Headers

from bentoservice.api.guard import Guard
from bentoservice.config import Settings


def refusal(
    settings: Settings, path: str = "/v1/models", method: str = "POST", **headers: str
) -> tuple[int, dict] | None:
    raw = Headers({name.replace("_", "-"): value for name, value in headers.items()})
    response = Guard(app=None, settings=settings).refusal(method, path, raw)  # type: ignore[arg-type]
    return None if response is None else (response.status_code, json.loads(response.body)["error"])


def test_without_a_configured_key_every_request_passes() -> None:
    assert refusal(Settings(api_key=None)) is None


def test_a_missing_or_wrong_key_is_a_401_in_openais_envelope() -> None:
    settings = Settings(api_key="sk-right")
    for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "sk-right"}):
        status, error = refusal(settings, **headers)
        assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert refusal(settings, authorization="Bearer sk-right") is None


def test_an_inference_key_is_a_403_on_admin_routes_only() -> None:
    settings = Settings(api_key="sk-admin", inference_api_keys="sk-inf")
    assert refusal(settings, "/v1/chat/completions", authorization="Bearer sk-inf") is None
    assert refusal(settings, "/v1/chat_templates", "GET", authorization="Bearer sk-inf") is None
    for path in (
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/adapters/load",
        "/fine_tune/submit",
        "/docs.json",
        "/v1/chat_templates",
    ):
        status, error = refusal(settings, path, authorization="Bearer sk-inf")
        assert status == 403 and error["type"] == "permission_error"
        assert refusal(settings, path, authorization="Bearer sk-admin") is None
    assert refusal(settings, "/readyz") is None and refusal(settings, "/metrics") is None
    assert refusal(Settings(api_key="k", metrics_need_key=True), "/metrics")[0] == 401


def _status(settings: Settings, path: str, body: list[bytes], content_length: str | None = None) -> int:
    """The status Guard answers a request with whose body arrives in `body`'s chunks (the app reads it all)."""
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(body) - 1} for i, chunk in enumerate(body)]
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-length", content_length.encode())] if content_length else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    asyncio.run(Guard(app, settings)(scope, receive, send))
    return sent[0]["status"]


def test_bodies_over_the_limit_are_a_413_with_files_allowed_more() -> None:
    settings = Settings(max_request_bytes=100, max_file_bytes=1000)
    assert _status(settings, "/v1/models", [b"x"], content_length="101") == 413
    assert _status(settings, "/v1/files", [b"x"], content_length="999") == 200
    assert _status(settings, "/v1/files", [b"x"], content_length="1001") == 413
    # Chunked: no Content-Length; counted as the chunks arrive.
    assert _status(settings, "/v1/models", [b"x" * 60, b"x" * 60]) == 413
    assert _status(settings, "/v1/models", [b"x" * 50, b"x" * 50]) == 200
    assert _status(settings, "/v1/files", [b"x" * 600, b"x" * 300]) == 200
