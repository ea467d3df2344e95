"""The web console: static files only (HTML, CSS, ES modules and a vendored Chart.js), mounted at /ui by the
service. The page holds no state and calls the public /v1 API with the user's API key, so serving it needs none."""

from __future__ import annotations

from importlib.resources import files

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

STATIC = files(__package__) / "static"


def create_console_app() -> Starlette:
    return Starlette(routes=[Mount("/", StaticFiles(directory=str(STATIC), html=True))])
