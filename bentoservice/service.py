"""The BentoML service: loads the served model from the model store and mounts the API at /v1."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import bentoml
from pydantic import ValidationError

from bentoservice import store
from bentoservice.api import create_app
from bentoservice.api.errors import APIError
from bentoservice.api.fine_tuning.routes import JobRequest, create_job, job_object
from bentoservice.build import bento_args, service_options, with_model_refs
from bentoservice.config import AdapterSpec, fine_tune_path_var, get_settings
from bentoservice.training.distributed import backends
from bentoservice.training.methods.encoder_config import ENCODER_METHODS
from bentoservice.training.jobs.store import FINAL, JobStore
from bentoservice.training.jobs.queue import JobQueue

logger = logging.getLogger(__name__)
settings = get_settings()
app = create_app(settings)
bento = bento_args()  # set when building a bento or serving one: its target and store models


# A @bentoml.task makes BentoML default the service's concurrency to 1; the engine batches many
# requests at once, so the service states its concurrency itself.
# BentoML's OpenTelemetry middleware opens a span for every message a reply sends: on a token stream that
# is one span per token, which cost more than half of the HTTP thread's time at 128 streams.
@bentoml.service(name="bentoservice", workers=1, labels={"openai_endpoint": "/v1"},
                 traffic={"timeout": 3600, "concurrency": settings.max_running + settings.max_queued},
                 tracing={"excluded_urls": ["/v1/chat/completions", "/v1/completions"]},
                 **service_options(bento))
@bentoml.asgi_app(app, path="/v1")
@with_model_refs(bento)
class LLM:
    """One engine per process: workers=1 keeps the default adapter and hot-loaded adapters in one place."""

    def __init__(self) -> None:
        from bentoservice.engine.embeddings import EncoderRegistry
        from bentoservice.engine.served import ServedModel

        stored = store.ensure_base(settings.model)
        card = store.card_for(stored.name)
        self.served = ServedModel(stored.name, stored.model_id, stored.path, settings,
                                  card.chat_template if card else None)
        self._load_adapters()
        app.state.served = self.served
        self.encoders = EncoderRegistry(settings)
        self._load_encoders()
        app.state.encoders = self.encoders
        self.jobs = JobStore()
        self._restore_fine_tunes()
        self._restore_encoders()
        self.queue = JobQueue(self.jobs, on_success=self._serve_fine_tune)
        self.queue.start()
        app.state.jobs = self.jobs

    def _load_adapters(self) -> None:
        fine_tune = os.environ.get(fine_tune_path_var(self.served.name))
        specs = ([AdapterSpec(id=fine_tune)] if fine_tune else []) + settings.adapters
        for spec in specs:
            loaded = self.served.load_adapter_from(spec.id, spec.name)
            if self.served.default_adapter is None:
                self.served.set_default_adapter(loaded.name)

    def _load_encoders(self) -> None:
        """The embedding and rerank models named in the settings. When none is named, the default (minilm) is
        skipped with a warning if it cannot load; a model the user named must load."""
        for kind, names in (("embedding", settings.embedding_models), ("rerank", settings.rerank_models)):
            for name in names:
                try:
                    self.encoders.load(store.ensure_encoder(name, kind))
                except Exception as exc:
                    if f"{kind}_models" in settings.model_fields_set:
                        raise
                    logger.warning("not serving the %s model %s: %s", kind, name, exc)

    def _restore_encoders(self) -> None:
        """After a restart, serve earlier rerank and embedding fine-tunes again, newest first, while room lasts."""
        done = [j for j in reversed(self.jobs.jobs_in("succeeded")) if j["config"]["method"] in ENCODER_METHODS]
        for job in done[: max(0, settings.max_encoders - len(self.encoders.all()))]:
            try:
                self.encoders.load(store.get(job["store_tag"]), job["fine_tuned_model"])
            except Exception as exc:
                logger.warning("could not serve %s again: %s", job["fine_tuned_model"], exc)

    def _serve_fine_tune(self, job: dict) -> None:
        """Hot-load a finished job's model under its fine_tuned_model name: a rerank or embedding model into the
        encoder registry, an LLM adapter when it fits this base."""
        if job["config"]["method"] in ENCODER_METHODS:
            self.encoders.load(store.get(job["store_tag"]), job["fine_tuned_model"])
            self.jobs.add_event(job["id"], f"{job['fine_tuned_model']} is being served")
            return
        if job["config"]["model"] != self.served.name or job["config"].get("merge_before_push"):
            return
        self.served.load_adapter_from(job["store_tag"], job["fine_tuned_model"])
        self.jobs.add_event(job["id"], f"{job['fine_tuned_model']} is being served")

    def _restore_fine_tunes(self) -> None:
        """After a restart, serve earlier fine-tunes again, newest first, while adapter slots last."""
        done = [j for j in reversed(self.jobs.jobs_in("succeeded")) if j["config"]["model"] == self.served.name]
        for job in done[: max(0, settings.max_loras - len(self.served.adapters))]:
            if job["fine_tuned_model"] not in self.served.adapters and not job["config"].get("merge_before_push"):
                try:
                    backends.fetch_result(job)  # trained by another replica or a Ray node: from the file store
                    self.served.load_adapter_from(job["store_tag"], job["fine_tuned_model"])
                except Exception as exc:
                    logger.warning("could not serve %s again: %s", job["fine_tuned_model"], exc)

    @bentoml.task
    def fine_tune(self, job: dict[str, Any]) -> dict[str, Any]:
        """Submit a fine-tuning job (the body of POST /v1/fine_tuning/jobs) and return it once it ends.

        Failures come back as OpenAI's error envelope: a task that raises can stay in_progress."""
        try:
            created = create_job(self.jobs, JobRequest.model_validate(job))
        except ValidationError as exc:
            first = exc.errors()[0]
            return {"error": {"message": first["msg"], "type": "invalid_request_error", "code": "invalid_value",
                              "param": ".".join(str(p) for p in first["loc"]) or None}}
        except APIError as exc:
            return {"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param,
                              "code": exc.code}}
        while (current := self.jobs.get_job(created["id"]))["status"] not in FINAL:
            time.sleep(1)
        return job_object(current)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.queue.stop()
        self.served.close()
