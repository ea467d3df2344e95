"""The BentoML service: loads the served model from the model store and mounts the API at /v1."""

from __future__ import annotations

import logging
import os

import bentoml

from bentoservice import store
from bentoservice.api import create_app
from bentoservice.config import AdapterSpec, fine_tune_path_var, get_settings
from bentoservice.training.jobs import JobStore
from bentoservice.training.queue import JobQueue

logger = logging.getLogger(__name__)
settings = get_settings()
app = create_app(settings)


@bentoml.service(name="bentoservice", workers=1, traffic={"timeout": 3600},
                 labels={"openai_endpoint": "/v1"})
@bentoml.asgi_app(app, path="/v1")
class LLM:
    """One engine per process: workers=1 keeps the default adapter and hot-loaded adapters in one place."""

    def __init__(self) -> None:
        from bentoservice.engine.served import ServedModel

        stored = store.ensure_base(settings.model)
        card = store.card_for(stored.name)
        self.served = ServedModel(stored.name, stored.model_id, stored.path, settings,
                                  card.chat_template if card else None)
        self._load_adapters()
        app.state.served = self.served
        self.jobs = JobStore()
        self._restore_fine_tunes()
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

    def _serve_fine_tune(self, job: dict) -> None:
        """Hot-load a finished job's adapter under its fine_tuned_model name, when it fits this base."""
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
                    self.served.load_adapter_from(job["store_tag"], job["fine_tuned_model"])
                except Exception as exc:
                    logger.warning("could not serve %s again: %s", job["fine_tuned_model"], exc)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.queue.stop()
        self.served.close()
