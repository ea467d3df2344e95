"""Scaling out: data parallel with accelerate, jobs on a real local Ray cluster, a PostgreSQL job store and an
fsspec file store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, free_port
from safetensors import safe_open
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from test_fine_tuning import jsonl, wait_for

from bentoservice import store
from bentoservice.config import get_settings
from bentoservice.training.distributed import backends
from bentoservice.training.jobs.queue import JobQueue
from bentoservice.training.jobs.store import JobStore, database
from bentoservice.training.jobs.store import jobs as jobs_table

VENV_BIN = Path(sys.executable).parent
# Replies of different lengths, so that the two halves of a batch weigh differently in its loss.
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say hello number {i}."},
            {"role": "assistant", "content": "Hello! " * (i + 1) + "Ahoy!"},
        ]
    }
    for i in range(8)
]
STEPS = 3
# The same global batch either way: 4 rows in one process, or 2 rows in each of two; in order, so that both see the
# same rows at each step.
COMMON = {
    "max_steps": STEPS,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "seed": 7,
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "train_sampling_strategy": "sequential",
}


def losses(jobs: JobStore, job_id: str) -> list[float]:
    rows, _ = jobs.list_events(job_id, limit=1000)
    return [e["data"]["loss"] for e in reversed(rows) if e["type"] == "metrics" and "loss" in (e["data"] or {})]


def adapter_shapes(tag: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a stored adapter: its format, whichever backend trained it."""
    folder = store.get(tag).path
    assert (folder / "adapter_config.json").is_file()
    with safe_open(folder / "adapter_model.safetensors", "pt") as tensors:
        return {name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()}


def run_jobs(queue: JobQueue, ids: list[str], timeout: float = 600) -> list[dict[str, Any]]:
    """Drive the real queue (launch, watch, settle) until the jobs end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue.tick()
        found = [queue.jobs.get_job(i) for i in ids]
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in found):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"jobs still running: {[(j['id'], j['status']) for j in found]}")


@pytest.fixture(scope="module")
def local_runs(tiny: store.StoredModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same few steps trained in one process (batch 4) and in two accelerate/DDP processes (batch 2 each)."""
    folder = tmp_path_factory.mktemp("scale-local")
    train = folder / "chats.jsonl"
    train.write_bytes(jsonl(CHATS))
    jobs = JobStore()
    ids = []
    for workers, batch in ((1, 4), (2, 2)):
        config = {
            "model": "tiny",
            "method": "sft",
            "train_file": str(train),
            "lora_dropout": 0.0,
            "adapter_name": f"scale-{workers}",
            "scale": {"backend": "local", "num_workers": workers, "gpus_per_worker": 0},
            "args": {**COMMON, "per_device_train_batch_size": batch, "output_dir": str(folder / f"out-{workers}")},
        }
        ids.append(
            jobs.add_job(model="tiny", request={}, config=config, fine_tuned_model=f"scale-{workers}", status="queued")[
                "id"
            ]
        )
    # One at a time, as the 2-core machine would be oversubscribed otherwise.
    queue = JobQueue(jobs, on_success=lambda job: None, concurrency=1)
    one, two = run_jobs(queue, ids)
    return {"jobs": jobs, "one": one, "two": two, "folder": folder}


def test_two_processes_train_like_one(local_runs: dict[str, Any]) -> None:
    one, two, jobs = local_runs["one"], local_runs["two"], local_runs["jobs"]
    assert one["status"] == "succeeded", one["error"]
    assert two["status"] == "succeeded", two["error"]
    # Two training processes ran the second job, one the first: each logs where it trains.
    for job, processes in ((one, 1), (two, 2)):
        log = (get_settings().jobs_dir / job["id"] / "runner.log").read_text()
        assert log.count("fine-tuning tiny") == processes, log[-3000:]
    single, double = losses(jobs, one["id"]), losses(jobs, two["id"])
    assert len(single) == len(double) == STEPS, (single, double)
    # DDP averages the gradients of the two halves of the batch: the same steps, up to float rounding.
    assert double == pytest.approx(single, rel=1e-4), (single, double)
    # Only rank 0 reports: one event per step, one adapter.
    assert adapter_shapes(two["store_tag"]) == adapter_shapes(one["store_tag"])


# --- a Ray cluster, a PostgreSQL job store and an fsspec file store ---------------------------------------------

PG_URL = os.environ.get("BENTOSERVICE_TEST_DATABASE_URL")


def _kill_cluster(*markers: str) -> None:
    """End the processes of one Ray cluster, by id: those whose command line names its temp folder or its address,
    and their children (Ray's agents rename themselves)."""
    import psutil

    found = [
        p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in markers)
    ]
    for process in [*found, *(c for p in found for c in _children(p))]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _children(process: Any) -> list[Any]:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_cluster(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on loopback, as a separate machine would be: its own model store (the base model imported there)
    and data folder. Returns its Jobs API address."""
    pytest.importorskip("ray")
    node = tmp_path_factory.mktemp("ray-node")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "BENTOML_HOME": str(node / "bentoml"),
        "BENTOSERVICE_DATA_DIR": str(node / "data"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }  # every Ray component on 127.0.0.1, not the host's address
    subprocess.run(
        [sys.executable, "-m", "bentoservice.cli", "import", "tiny", "--model-id", str(tiny_dir)],
        env=env,
        check=True,
        capture_output=True,
    )
    gcs, dashboard = free_port(), free_port()
    # Free ports for every service with a fixed default port, so that this cluster meets no other on the machine.
    ports = {
        "--port": gcs,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--temp-dir",
        temp,
        "--disable-usage-stats",
        *(str(x) for pair in ports.items() for x in pair),
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _kill_cluster(temp, f"127.0.0.1:{gcs}")
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def scaled(
    tiny: store.StoredModel, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path]]:
    """A server whose jobs may train on the Ray cluster, with its files in an fsspec folder and, when the test run
    has one (make test starts it), its job store in PostgreSQL."""
    folder = tmp_path_factory.mktemp("scaled")
    env = {
        "BENTOSERVICE_DATA_DIR": str(folder / "data"),
        "BENTOSERVICE_FILES_URL": f"file://{folder}/files",
        "BENTOSERVICE_RAY_ADDRESS": ray_cluster,
    }
    if PG_URL:
        env["BENTOSERVICE_DATABASE_URL"] = PG_URL
    server = Server("tiny", env=env)
    yield server, folder / "files"
    server.stop()


def test_ray_job_with_two_workers(scaled: tuple[Server, Path], ray_cluster: str, local_runs: dict[str, Any]) -> None:
    from ray.job_submission import JobSubmissionClient

    server, files = scaled
    client = server.client()
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="ray",
        extra_body={
            "backend": "ray",
            "num_workers": 2,
            "gpus_per_worker": 0,
            "max_steps": STEPS,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 2,
        },
    )
    done = wait_for(client, job.id, timeout=600)
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    assert done.status == "succeeded", (done.error, [e.message for e in events])
    # It ran as a Ray job, on two Ray Train workers.
    ray = JobSubmissionClient(ray_cluster)
    assert str(ray.get_job_status(f"bentoservice-{job.id}-1").value) == "SUCCEEDED"
    ray_log = ray.get_job_logs(f"bentoservice-{job.id}-1")
    assert ray_log.count("fine-tuning tiny") == 2, ray_log[-3000:]
    # Its events came back from the cluster into this server's job store, rank 0's only.
    steps = [e.data["step"] for e in events if e.type == "metrics" and "loss" in e.data]
    assert sorted(steps) == list(range(1, STEPS + 1))
    # The adapter was trained into the node's model store and came back through the file store, in the same format
    # as a local run's; the server serves it.
    assert (files / "results" / f"{job.id}.bentomodel").is_file()
    assert adapter_shapes(done.outputs["store_tag"]) == adapter_shapes(local_runs["one"]["store_tag"])
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=CHATS[0]["messages"][:1], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None


def test_ray_job_cancel(scaled: tuple[Server, Path], ray_cluster: str) -> None:
    from ray.job_submission import JobSubmissionClient

    server, _ = scaled
    client = server.client()
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        extra_body={
            "backend": "ray",
            "num_workers": 2,
            "gpus_per_worker": 0,
            "max_steps": 5000,
            "per_device_train_batch_size": 2,
        },
    )
    deadline = time.monotonic() + 300
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data):
        assert time.monotonic() < deadline, "the Ray job never started training"
        time.sleep(1)
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_for(client, job.id, timeout=120).status == "cancelled"
    status = JobSubmissionClient(ray_cluster).get_job_status(f"bentoservice-{job.id}-1")
    assert str(status.value) == "STOPPED"


@pytest.mark.skipif(not PG_URL, reason="no PostgreSQL for this run: `make test` starts one")
def test_postgres_job_store_and_fsspec_files(scaled: tuple[Server, Path]) -> None:
    server, files = scaled
    client = server.client()
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    assert (files / uploaded.id).read_bytes() == jsonl(CHATS)  # the file store, not data_dir/files
    assert client.files.content(uploaded.id).content == jsonl(CHATS)
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=uploaded.id, extra_body={"max_steps": 2, "per_device_train_batch_size": 2}
    )
    done = wait_for(client, job.id, timeout=600)
    assert done.status == "succeeded", done.error
    # The job, its events and the file are rows of the PostgreSQL database.
    engine = create_engine(PG_URL)
    with engine.connect() as conn:
        row = conn.execute(select(jobs_table).where(jobs_table.c.id == job.id)).mappings().one()
        assert row["status"] == "succeeded" and row["config"]["scale"]["backend"] == "local"
    assert JobStore(engine).get_file(uploaded.id)["bytes"] == len(jsonl(CHATS))
    assert len(JobStore(engine).list_events(job.id, limit=100)[0]) >= 3
    client.files.delete(uploaded.id)
    assert not (files / uploaded.id).exists()


def test_scale_fields_are_checked(scaled: tuple[Server, Path]) -> None:
    server, _ = scaled
    uploaded = server.client().files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    base = {"model": "tiny", "training_file": uploaded.id}
    for extra, param in (
        ({"gpus_per_worker": 2}, "gpus_per_worker"),
        ({"num_workers": 0}, "num_workers"),
        ({"distributed": "zero"}, "distributed"),
        ({"backend": "slurm"}, "backend"),
        ({"distributed": "fsdp", "gpus_per_worker": 0}, "distributed"),
    ):
        reply = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json={**base, **extra}, timeout=30)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_ray_backend_needs_a_cluster() -> None:
    """This test process has no BENTOSERVICE_RAY_ADDRESS."""
    with pytest.raises(backends.BackendError, match="BENTOSERVICE_RAY_ADDRESS") as raised:
        backends.check(backends.Scale(backend="ray", num_workers=2))
    assert raised.value.param == "backend"


def test_file_store_copies_remote_files(tmp_path: Path) -> None:
    """A training file at a URL that is no local path is copied next to the job before training."""
    import fsspec

    from bentoservice.training.data import filestore

    with fsspec.open("memory://bucket/file-abc", "wb") as out:
        out.write(b'{"x": 1}\n')
    copy = filestore.local_path("memory://bucket/file-abc", tmp_path / "files")
    assert copy == tmp_path / "files" / "file-abc" and copy.read_bytes() == b'{"x": 1}\n'
    local = tmp_path / "here.jsonl"
    local.write_text("{}")
    assert filestore.local_path(str(local), tmp_path / "other") == local


def test_older_database_gains_new_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Table("jobs", MetaData(), Column("id", String(64), primary_key=True), Column("pid", Integer))
    old.metadata.create_all(create_engine(url))
    engine = database(url)
    assert "host" in {c["name"] for c in inspect(engine).get_columns("jobs")}
