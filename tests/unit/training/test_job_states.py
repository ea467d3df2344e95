"""The job state machine in the job store (real SQLite): transitions happen only from the states they name, and
cancelling depends on how far the job got."""

from __future__ import annotations

from pathlib import Path

import pytest

from bentoservice.training.jobs.queue import request_cancel
from bentoservice.training.jobs.store import ACTIVE, FINAL, JobStore, database


@pytest.fixture
def jobs(tmp_path: Path) -> JobStore:
    return JobStore(database(f"sqlite:///{tmp_path / 'jobs.db'}"))


def new_job(jobs: JobStore) -> str:
    return jobs.add_job(model="tiny", request={}, config={"method": "sft"}, fine_tuned_model="ft:tiny:x")["id"]


def messages(jobs: JobStore, job_id: str) -> list[str]:
    return [row["message"] for row in jobs.list_events(job_id, limit=100)[0]]


def test_states_partition_into_active_and_final() -> None:
    assert set(ACTIVE).isdisjoint(FINAL) and "validating_files" in ACTIVE and "cancelled" in FINAL


def test_a_transition_happens_only_from_the_states_it_names(jobs: JobStore) -> None:
    job_id = new_job(jobs)
    assert jobs.get_job(job_id)["status"] == "validating_files"
    assert not jobs.update_job(job_id, only_if=("queued",), status="running")
    assert jobs.update_job(job_id, only_if=("validating_files",), status="queued")
    assert jobs.update_job(job_id, only_if=("queued",), status="running")
    assert jobs.update_job(job_id, only_if=("running",), status="succeeded")
    assert not jobs.update_job(job_id, only_if=("running",), status="failed")  # a finished job stays finished
    assert jobs.get_job(job_id)["status"] == "succeeded"
    assert [j["id"] for j in jobs.jobs_in(*FINAL)] == [job_id]


def test_cancelling_a_queued_job_ends_it_at_once(jobs: JobStore) -> None:
    job_id = new_job(jobs)
    jobs.update_job(job_id, status="queued")
    request_cancel(jobs, job_id)
    job = jobs.get_job(job_id)
    assert (job["status"], job["cancel_requested"]) == ("cancelled", 1) and job["finished_at"] is not None
    assert messages(jobs, job_id) == ["The job was cancelled"]


def test_cancelling_a_running_job_asks_the_queue(jobs: JobStore) -> None:
    job_id = new_job(jobs)
    jobs.update_job(job_id, status="running")
    request_cancel(jobs, job_id)
    job = jobs.get_job(job_id)
    assert (job["status"], job["cancel_requested"]) == ("running", 1)
    assert messages(jobs, job_id) == ["Cancellation requested"]


def test_cancelling_a_finished_job_changes_nothing(jobs: JobStore) -> None:
    job_id = new_job(jobs)
    jobs.update_job(job_id, status="failed")
    request_cancel(jobs, job_id)
    assert jobs.get_job(job_id)["cancel_requested"] == 0 and messages(jobs, job_id) == []


def test_jobs_list_newest_first_in_pages(jobs: JobStore) -> None:
    ids = [new_job(jobs) for _ in range(3)]
    first, more = jobs.list_jobs(limit=2)
    rest, no_more = jobs.list_jobs(after=first[-1]["id"], limit=2)
    assert more and not no_more
    assert sorted(j["id"] for j in first + rest) == sorted(ids) and len(first + rest) == 3
