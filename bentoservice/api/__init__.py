"""The HTTP face: one FastAPI app mounted at /v1 by the BentoML service. No torch in here."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match

from bentoservice.api.adapters import routes as adapters
from bentoservice.api.completions import routes as openai
from bentoservice.api.embeddings import routes as embeddings
from bentoservice.api.errors import envelope, install_error_handlers
from bentoservice.api.files import routes as files
from bentoservice.api.fine_tuning import routes as fine_tuning
from bentoservice.api.graders import routes as graders
from bentoservice.api.openapi import install_openapi


def create_app() -> FastAPI:
    """The routes; api.guard's keys and body limits wrap the whole server around them (see service.py)."""
    app = FastAPI(title="bentoservice", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.started = int(time.time())
    app.state.served = None
    app.state.jobs = None
    app.state.encoders = None
    install_error_handlers(app)
    routers = [openai.router, adapters.router, files.router, fine_tuning.router, graders.router, embeddings.router]
    for router in routers:
        app.include_router(router)
    _add_catch_all(app, [route for router in routers for route in router.routes])
    install_openapi(app)
    return app


def _add_catch_all(app: FastAPI, routes: list[BaseRoute]) -> None:
    """BentoML forwards only paths the app routes, so the app must own every /v1 path to answer
    unknown ones in OpenAI's envelope. Added last: real routes match first."""
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @app.api_route("/{path:path}", methods=methods, include_in_schema=False)
    async def unknown_route(request: Request, path: str) -> JSONResponse:
        allowed = sorted(
            {
                m
                for route in routes
                if route.matches(request.scope)[0] == Match.PARTIAL
                for m in getattr(route, "methods", ())
            }
        )
        if allowed:
            return envelope(
                405,
                f"Method {request.method} is not allowed on {request.url.path}",
                None,
                "method_not_allowed",
                {"Allow": ", ".join(allowed)},
            )
        return envelope(404, f"Unknown route: {request.method} {request.url.path}", None, "unknown_route")
