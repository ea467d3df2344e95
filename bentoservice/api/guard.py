"""The API keys and the body size limits, as plain ASGI middleware on the whole BentoML server (the /v1 app,
BentoML's task routes and its /docs.json alike): a streamed reply passes through untouched (Starlette's
BaseHTTPMiddleware would relay every chunk through another task)."""

from __future__ import annotations

import hmac
import re
from typing import Literal

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bentoservice.api.errors import BodyTooLarge, envelope
from bentoservice.config import Settings

Role = Literal["inference", "admin"]

# Paths anyone may read: BentoML's probes (and /metrics unless settings.metrics_need_key), and the web console's
# static files (its pages send the key the user gives them to /v1).
_OPEN = ("/readyz", "/livez")
_OPEN_PREFIXES = ("/ui",)
# What only an admin key may call: state that training, files and adapters change, and BentoML's task routes.
_ADMIN_PREFIXES = (
    "/v1/files",
    "/v1/fine_tuning",
    "/v1/finetune",
    "/v1/adapters",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/fine_tune/",
    "/docs.json",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def required_role(method: str, path: str) -> Role:
    if path.startswith(_ADMIN_PREFIXES) or (path == "/v1/chat_templates" and method != "GET"):
        return "admin"
    return "inference"


def _matches(given: bytes, keys: list[bytes]) -> bool:
    """Constant-time against every key, so the time taken says nothing of which key came close."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.admin_keys = [k.encode() for k in settings.admin_keys()]
        self.inference_keys = [k.encode() for k in settings.inference_keys()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope["method"], scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if _CONTROL.search(scope["path"]):
            # Starlette's mounts match no path with a newline in it: BentoML would answer a bare "Not Found".
            answer = envelope(404, f"Unknown route: {scope['method']} {scope['path']!r}", None, None)
            await answer(scope, receive, send)
            return
        limit, _ = self.settings.body_limit(scope["path"])
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            await _too_large(int(length), limit)(scope, receive, send)
            return
        await self._limited(scope, receive, send, limit)

    def _open(self, path: str) -> bool:
        return (
            path in _OPEN
            or path.startswith(_OPEN_PREFIXES)
            or (path == "/metrics" and not self.settings.metrics_need_key)
        )

    def refusal(self, method: str, path: str, headers: Headers) -> JSONResponse | None:
        if not (self.admin_keys or self.inference_keys) or self._open(path):
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if given and _matches(given, self.admin_keys):
            return None
        if given and _matches(given, self.inference_keys):
            if required_role(method, path) == "inference":
                return None
            return envelope(
                403,
                f"This API key may call inference routes only; {method} {path} needs an admin key.",
                None,
                "insufficient_permissions",
            )
        return envelope(
            401, "Incorrect API key provided: send it as `Authorization: Bearer <key>`.", None, "invalid_api_key"
        )

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Count the body as it arrives (a chunked body has no Content-Length to check first)."""
        received, started = 0, False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:  # raised outside the /v1 app, e.g. by BentoML's own routes
            if started:
                raise
            await _too_large(None, exc.limit)(scope, receive, send)


def _too_large(length: int | None, limit: int) -> JSONResponse:
    what = f"of {length} bytes " if length is not None else ""
    return envelope(413, f"request body {what}exceeds the limit of {limit} bytes", None, "request_too_large")
