"""The hand-off from finished jobs to the serving side: a job that succeeds is hot-loaded under its
fine_tuned_model name, and after a restart earlier fine-tunes are served again, each loaded on its first request."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bentoservice import store
from bentoservice.config import Settings
from bentoservice.training.distributed import backends
from bentoservice.training.jobs.store import JobStore
from bentoservice.training.methods.encoder_config import ENCODER_METHODS

if TYPE_CHECKING:
    from bentoservice.engine.embeddings import EncoderRegistry
    from bentoservice.engine.served import ServedModel

logger = logging.getLogger(__name__)


def serve_fine_tune(jobs: JobStore, served: ServedModel, encoders: EncoderRegistry, job: dict[str, Any]) -> None:
    """Hot-load a finished job's model under its fine_tuned_model name: a rerank or embedding model into the
    encoder registry, an LLM adapter when it fits this base."""
    if job["config"]["method"] in ENCODER_METHODS:
        encoders.load(store.get(job["store_tag"]), job["fine_tuned_model"])
        jobs.add_event(job["id"], f"{job['fine_tuned_model']} is being served")
        return
    if job["config"]["model"] != served.name or job["config"].get("merge_before_push"):
        return
    served.load_adapter_from(job["store_tag"], job["fine_tuned_model"])
    jobs.add_event(job["id"], f"{job['fine_tuned_model']} is being served")


def restore_fine_tunes(jobs: JobStore, served: ServedModel) -> None:
    """After a restart, serve earlier fine-tunes again under their names, each loaded on its first request."""
    for job in jobs.jobs_in("succeeded"):
        if (
            job["config"]["model"] == served.name
            and job["fine_tuned_model"] not in served.catalog
            and not job["config"].get("merge_before_push")
        ):
            try:
                backends.fetch_result(job)  # trained by another replica or a Ray node: from the file store
                served.register(job["fine_tuned_model"], job["store_tag"])
            except Exception as exc:
                logger.warning("could not serve %s again: %s", job["fine_tuned_model"], exc)


def restore_encoders(jobs: JobStore, encoders: EncoderRegistry, settings: Settings) -> None:
    """After a restart, serve earlier rerank and embedding fine-tunes again, newest first, while room lasts."""
    done = [j for j in reversed(jobs.jobs_in("succeeded")) if j["config"]["method"] in ENCODER_METHODS]
    for job in done[: max(0, settings.max_encoders - len(encoders.all()))]:
        try:
            encoders.load(store.get(job["store_tag"]), job["fine_tuned_model"])
        except Exception as exc:
            logger.warning("could not serve %s again: %s", job["fine_tuned_model"], exc)
