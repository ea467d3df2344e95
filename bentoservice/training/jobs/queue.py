"""The job queue in the serving process: starts each job's training, watches, cancels, recovers.

Every job trains in processes of its own, on this machine or on a Ray cluster (training.backends); a local
one runs in its own session, so a cancel kills the whole group and frees its memory. The queue keeps no
state the job store does not have: after a restart it adopts trainings that outlived the server, and
requeues jobs whose training died, to resume from their newest checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from bentoservice.config import get_settings
from bentoservice.training.data import filestore
from bentoservice.training.distributed import backends
from bentoservice.training.jobs.store import JobStore, now

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class JobQueue:
    def __init__(
        self,
        jobs: JobStore,
        on_success: Callable[[dict[str, Any]], None],
        concurrency: int | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        self.jobs = jobs
        self.on_success = on_success
        self.concurrency = concurrency or get_settings().job_concurrency
        self.poll_seconds = poll_seconds
        self.runners: dict[str, backends.Handle] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)

    def start(self) -> None:
        self._recover()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, and stop this server's local trainings: no process outlives a stopped server. Each such job
        is queued again, to resume from its newest checkpoint at the next start. Ray jobs go on (adopted then); a
        server killed outright leaves its trainings running, and the next start adopts them."""
        self._stop.set()
        self._thread.join(timeout=10)
        for job_id, runner in list(self.runners.items()):
            if isinstance(runner, backends.LocalRun):
                runner.stop()
                del self.runners[job_id]
                self._stopped(job_id)

    def _stopped(self, job_id: str) -> None:
        job = self.jobs.get_job(job_id)
        if job is None or job["status"] != "running" or job["store_tag"]:
            return  # a trained job's adapter is served at the next start
        if job["cancel_requested"] or job["pause_requested"]:
            self._settle(job)
        elif self.jobs.update_job(
            job_id,
            only_if=("running",),
            status="queued",
            pid=None,
            estimated_finish=None,
            attempts=max(0, job["attempts"] - 1),  # a server's stop is no failed attempt
        ):
            self.jobs.add_event(
                job_id,
                "The server stopped; the job is queued to resume from its newest checkpoint at the next start",
                level="warn",
            )

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception:
                log.exception("job queue tick failed")

    def tick(self) -> None:
        self._validate()
        self._reap()
        self._cancel()
        self._launch()

    # -- steps --------------------------------------------------------------------------------

    def _recover(self) -> None:
        for job in self.jobs.jobs_in("running"):
            if not backends.launched_here(job):
                continue
            if (adopted := backends.adopt(job)) is not None:
                log.info("adopting the training of job %s (%s)", job["id"], job["host"] or job["pid"])
                self.runners[job["id"]] = adopted
            else:
                self._settle(job)

    def _settle(self, job: dict[str, Any]) -> None:
        """A running job whose runner has exited: cancelled, trained (then served), or interrupted."""
        if job["cancel_requested"]:
            self._cancelled(job["id"])
        elif job["pause_requested"] and not job["store_tag"]:  # it died before it could say so itself
            if self.jobs.update_job(job["id"], only_if=("running",), status="paused", pid=None, estimated_finish=None):
                self.jobs.add_event(job["id"], "Fine-tuning job paused; it resumes from its newest checkpoint")
        elif job["store_tag"]:
            self._complete(job)
        else:
            self._interrupted(job)

    def _complete(self, job: dict[str, Any]) -> None:
        try:
            backends.fetch_result(job)
            self.on_success(job)
        except Exception as exc:
            log.exception("serving the result of job %s failed", job["id"])
            self.jobs.add_event(
                job["id"], f"The fine-tuned model could not be loaded into the server: {exc}", level="warn"
            )
        if self.jobs.update_job(
            job["id"], only_if=("running",), status="succeeded", finished_at=now(), pid=None, estimated_finish=None
        ):
            self.jobs.add_event(job["id"], f"New fine-tuned model created: {job['fine_tuned_model']}")
            self.jobs.add_event(job["id"], "The job has successfully completed")

    def _interrupted(self, job: dict[str, Any]) -> None:
        """A runner died without recording an outcome: requeue to resume, or fail after MAX_ATTEMPTS."""
        if job["attempts"] >= MAX_ATTEMPTS:
            message = f"the training process stopped unexpectedly {job['attempts']} times"
            if self.jobs.update_job(
                job["id"],
                only_if=("running",),
                status="failed",
                finished_at=now(),
                error={"code": "training_interrupted", "message": message, "param": None},
            ):
                self.jobs.add_event(job["id"], f"Fine-tuning failed: {message}", level="error")
        elif self.jobs.update_job(job["id"], only_if=("running",), status="queued", pid=None):
            self.jobs.add_event(
                job["id"],
                "The training process stopped; the job is queued to resume from its newest checkpoint",
                level="warn",
            )

    def _cancelled(self, job_id: str) -> None:
        if self.jobs.update_job(
            job_id, only_if=("running", "queued", "validating_files"), status="cancelled", finished_at=now(), pid=None
        ):
            self.jobs.add_event(job_id, "The job was cancelled")

    def _validate(self) -> None:
        for job in self.jobs.jobs_in("validating_files"):
            missing = [
                f
                for f in (job["config"].get("train_file"), job["config"].get("test_file"))
                if f and not filestore.exists(f)
            ]
            if missing:
                self.jobs.update_job(
                    job["id"],
                    only_if=("validating_files",),
                    status="failed",
                    finished_at=now(),
                    error={
                        "code": "invalid_file",
                        "param": "training_file",
                        "message": "an uploaded file of the job is gone",
                    },
                )
            elif self.jobs.update_job(job["id"], only_if=("validating_files",), status="queued"):
                self.jobs.add_event(job["id"], "Files validated; the job is queued")

    def _reap(self) -> None:
        for job_id, runner in list(self.runners.items()):
            if not runner.finished():
                continue
            del self.runners[job_id]
            job = self.jobs.get_job(job_id)
            if job is not None and job["status"] == "running":
                if not job["store_tag"] and (note := runner.exit_note()):
                    self.jobs.add_event(job_id, note, level="warn")
                self._settle(job)

    def _cancel(self) -> None:
        for job_id, runner in self.runners.items():
            job = self.jobs.get_job(job_id)
            if job is not None and job["cancel_requested"]:
                runner.kill()

    def _launch(self) -> None:
        for job in self.jobs.jobs_in("queued"):
            if len(self.runners) >= self.concurrency:
                return
            if not self.jobs.update_job(
                job["id"],
                only_if=("queued",),
                status="running",
                started_at=job["started_at"] or now(),
                attempts=job["attempts"] + 1,
            ):
                continue
            try:
                handle, where = backends.launch({**job, "attempts": job["attempts"] + 1})
            except Exception as exc:  # e.g. an unreachable Ray cluster: fail the job with the reason
                log.exception("launching job %s failed", job["id"])
                if self.jobs.update_job(
                    job["id"],
                    only_if=("running",),
                    status="failed",
                    finished_at=now(),
                    error={
                        "code": "backend_unavailable",
                        "param": "backend",
                        "message": f"the training could not start: {exc}",
                    },
                ):
                    self.jobs.add_event(
                        job["id"], f"Fine-tuning failed: the training could not start: {exc}", level="error"
                    )
                continue
            self.jobs.update_job(job["id"], **where)
            self.runners[job["id"]] = handle


def request_cancel(jobs: JobStore, job_id: str) -> None:
    """Cancel a job: at once when it is not training; a running one is killed by the queue."""
    if not jobs.update_job(
        job_id,
        only_if=("validating_files", "queued", "paused"),
        status="cancelled",
        finished_at=now(),
        cancel_requested=1,
    ):
        if jobs.update_job(job_id, only_if=("running",), cancel_requested=1):
            jobs.add_event(job_id, "Cancellation requested")
        return
    jobs.add_event(job_id, "The job was cancelled")


def request_pause(jobs: JobStore, job_id: str) -> bool:
    """Ask a running job to pause: its runner saves a checkpoint and exits (status `paused`). False if not running."""
    if not jobs.update_job(job_id, only_if=("running",), pause_requested=1):
        return False
    jobs.add_event(job_id, "Pause requested")
    return True


def request_resume(jobs: JobStore, job_id: str) -> bool:
    """Queue a paused job again, to continue from its newest checkpoint. False if it is not paused."""
    if not jobs.update_job(
        job_id, only_if=("paused",), status="queued", pause_requested=0, attempts=0
    ):  # a pause is no failed attempt
        return False
    jobs.add_event(job_id, "Fine-tuning job resume requested; the job is queued")
    return True
