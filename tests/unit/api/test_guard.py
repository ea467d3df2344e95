"""The API key and body size checks every route goes through (api.Guard), on requests built by hand."""

from __future__ import annotations

import json

from starlette.requests import Request

from bentoservice.api import Guard
from bentoservice.config import Settings


def request(path: str = "/v1/models", **headers: str) -> Request:
    raw = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""})


def refusal(settings: Settings, req: Request) -> tuple[int, dict] | None:
    response = Guard(app=None, settings=settings).refusal(req)  # type: ignore[arg-type]
    return None if response is None else (response.status_code, json.loads(response.body)["error"])


def test_without_a_configured_key_every_request_passes() -> None:
    assert refusal(Settings(api_key=None), request()) is None


def test_a_missing_or_wrong_key_is_a_401_in_openais_envelope() -> None:
    settings = Settings(api_key="sk-right")
    for req in (request(), request(authorization="Bearer sk-wrong"), request(authorization="sk-right")):
        status, error = refusal(settings, req)
        assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert refusal(settings, request(authorization="Bearer sk-right")) is None


def test_bodies_over_the_limit_are_a_413_with_files_allowed_more() -> None:
    settings = Settings(max_request_bytes=100, max_file_bytes=1000)
    status, error = refusal(settings, request(content_length="101"))
    assert status == 413 and error["code"] == "request_too_large"
    assert refusal(settings, request("/v1/files", content_length="999")) is None
    assert refusal(settings, request("/v1/files", content_length="1001"))[0] == 413
