"""The BentoML service: declares the service and mounts the API at /v1 and the web console at /ui; what it serves
comes from engine.startup, the jobs' hand-off to serving from training.jobs.handoff."""

from __future__ import annotations

from functools import partial
from typing import Any

import bentoml

from bentoservice.api import create_app
from bentoservice.api.console import create_console_app
from bentoservice.api.fine_tuning.routes import submit_and_wait
from bentoservice.api.guard import Guard
from bentoservice.build import bento_args, service_options, with_model_refs
from bentoservice.config import get_settings
from bentoservice.training.jobs import handoff
from bentoservice.training.jobs.queue import JobQueue
from bentoservice.training.jobs.store import JobStore

settings = get_settings()
app = create_app()
bento = bento_args()  # set when building a bento or serving one: its target and store models


# A @bentoml.task makes BentoML default the service's concurrency to 1; the engine batches many
# requests at once, so the service states its concurrency itself.
# BentoML's OpenTelemetry middleware opens a span for every message a reply sends: on a token stream that
# is one span per token, which cost more than half of the HTTP thread's time at 128 streams.
@bentoml.service(
    name="bentoservice",
    workers=1,
    labels={"openai_endpoint": "/v1"},
    traffic={"timeout": 3600, "concurrency": settings.max_running + settings.max_queued},
    tracing={"excluded_urls": ["/v1/chat/completions", "/v1/completions"]},
    **service_options(bento),
)
@bentoml.asgi_app(app, path="/v1")
@bentoml.asgi_app(create_console_app(), path="/ui")  # the web console: static files, no state
@with_model_refs(bento)
class LLM:
    """One engine per process: workers=1 keeps the default adapter and hot-loaded adapters in one place."""

    def __init__(self) -> None:
        from bentoservice.engine import startup

        self.served = startup.served_model(settings)
        app.state.served = self.served
        self.encoders = startup.encoder_registry(settings)
        app.state.encoders = self.encoders
        self.jobs = JobStore()
        handoff.restore_fine_tunes(self.jobs, self.served)
        handoff.restore_encoders(self.jobs, self.encoders, settings)
        self.queue = JobQueue(
            self.jobs, on_success=partial(handoff.serve_fine_tune, self.jobs, self.served, self.encoders)
        )
        self.queue.start()
        app.state.jobs = self.jobs

    @bentoml.task
    def fine_tune(self, job: dict[str, Any]) -> dict[str, Any]:
        """Submit a fine-tuning job (the body of POST /v1/fine_tuning/jobs) and return it once it ends.

        Failures come back as OpenAI's error envelope: a task that raises can stay in_progress."""
        return submit_and_wait(self.jobs, job)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.queue.stop()
        self.served.close()


# Around the whole server, so that BentoML's own routes (the fine_tune task's, /docs.json) need a key too.
LLM.add_asgi_middleware(Guard, settings=settings)  # type: ignore[attr-defined]  # bentoml.service returns a Service
