"""The HTTP face: one FastAPI app mounted at /v1 by the BentoML service. No torch in here."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from bentoservice.api.adapters import routes as adapters
from bentoservice.api.completions import routes as openai
from bentoservice.api.embeddings import routes as embeddings
from bentoservice.api.errors import envelope, install_error_handlers
from bentoservice.api.files import routes as files
from bentoservice.api.fine_tuning import routes as fine_tuning
from bentoservice.config import Settings


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="bentoservice", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.started = int(time.time())
    app.state.served = None
    app.state.jobs = None
    app.state.encoders = None
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(embeddings.router)
    _add_catch_all(app)

    app.add_middleware(Guard, settings=settings)
    return app


class Guard:
    """The API key and the body size limit, as plain ASGI middleware: a streamed reply passes through
    untouched (Starlette's BaseHTTPMiddleware would relay every chunk through another task)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(Request(scope)) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        settings = self.settings
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            return envelope(401, "Incorrect API key provided: send it as `Authorization: Bearer <key>`.",
                            None, "invalid_api_key")
        limit = settings.max_file_bytes if request.url.path.endswith("/files") else settings.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return envelope(413, f"request body of {length} bytes exceeds the limit of {limit} bytes", None,
                            "request_too_large")
        return None


def _add_catch_all(app: FastAPI) -> None:
    """BentoML forwards only paths the app routes, so the app must own every /v1 path to answer
    unknown ones in OpenAI's envelope. Added last: real routes match first."""
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @app.api_route("/{path:path}", methods=methods, include_in_schema=False)
    async def unknown_route(request: Request, path: str) -> JSONResponse:
        for route in app.routes[:-1]:
            match, _ = route.matches(request.scope)
            if match == Match.PARTIAL:
                return envelope(405, f"Method {request.method} is not allowed on {request.url.path}")
        return envelope(404, f"Unknown route: {request.method} {request.url.path}", None, "unknown_route")
