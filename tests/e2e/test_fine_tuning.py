"""The fine-tuning service: files and jobs through the openai SDK, OPEA's calls, cancel, restarts."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server

CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"Say hello number {i}."},
            {"role": "assistant", "content": f"Hello number {i}! Ahoy!"},
        ]
    }
    for i in range(8)
]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"Capital of country {i}?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    }
    for i in range(8)
]
ALPACA = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in ("red", "green", "blue", "gold")]
FINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-data")


@pytest.fixture(scope="module")
def server(tiny, data_dir: Path):
    server = Server("tiny", env={"BENTOSERVICE_DATA_DIR": str(data_dir), "BENTOSERVICE_MAX_FILE_BYTES": "200000"})
    yield server
    server.stop()


def wait_for(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job.status}")


def wait_for_event(client: openai.OpenAI, job_id: str, kind: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.type == kind for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no {kind} event for {job_id}")


def test_sft_job_end_to_end(server: Server) -> None:
    client = server.client()
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    assert uploaded.object == "file" and uploaded.filename == "chats.jsonl" and uploaded.bytes == len(jsonl(CHATS))
    assert client.files.content(uploaded.id).content == jsonl(CHATS)
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="hello",
        hyperparameters={"n_epochs": 1, "batch_size": 2},
        extra_body={"max_steps": 3, "save_steps": 1, "learning_rate": 1e-3},
    )
    assert job.status == "validating_files" and job.hyperparameters.batch_size == 2
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft:tiny:hello:")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    losses = [e.data["loss"] for e in events if e.type == "metrics" and "loss" in e.data]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [3, 2, 1]
    assert checkpoints[0].metrics.step == 3 and checkpoints[0].fine_tuned_model_checkpoint
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=CHATS[0]["messages"][:1], max_tokens=5, temperature=0
    )
    assert reply.choices[0].message.content is not None
    assert [j.id for j in client.fine_tuning.jobs.list().data][0] == job.id


def test_dpo_job(server: Server) -> None:
    client = server.client()
    uploaded = client.files.create(file=("pairs.jsonl", jsonl(PAIRS)), purpose="preference")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        extra_body={"max_steps": 2},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert any("loss" in e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data)
    reply = client.chat.completions.create(model=done.fine_tuned_model, messages=PAIRS[0]["prompt"], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_opea_flow(server: Server) -> None:
    url = f"{server.url}/v1"
    files = {"file": ("alpaca_data.json", json.dumps(ALPACA).encode(), "application/json")}
    uploaded = httpx.post(f"{url}/files", files=files, data={"purpose": "fine-tune"}, timeout=30)
    assert uploaded.status_code == 200 and uploaded.json()["format"] == "alpaca"
    body = {
        "training_file": "alpaca_data.json",
        "model": "tiny",
        "General": {"lora_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj"]}},
        "Dataset": {"max_length": 256},
        "Training": {"max_train_steps": 2, "batch_size": 2},
    }
    created = httpx.post(f"{url}/fine_tuning/jobs", json=body, timeout=30)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert job_id in [j["id"] for j in httpx.get(f"{url}/fine_tuning/jobs", timeout=30).json()["data"]]
    done = wait_for(server.client(), job_id)
    assert done.status == "succeeded", done.error
    retrieved = httpx.post(f"{url}/fine_tuning/jobs/retrieve", json={"fine_tuning_job_id": job_id}, timeout=30)
    assert retrieved.json()["status"] == "succeeded"
    checkpoints = httpx.post(f"{url}/finetune/list_checkpoints", json={"fine_tuning_job_id": job_id}, timeout=30)
    assert checkpoints.status_code == 200 and checkpoints.json()[0]["step_number"] == 2
    second = httpx.post(f"{url}/fine_tuning/jobs", json={**body, "Training": {"max_train_steps": 500}}, timeout=30)
    cancelled = httpx.post(
        f"{url}/fine_tuning/jobs/cancel", json={"fine_tuning_job_id": second.json()["id"]}, timeout=30
    )
    assert cancelled.status_code == 200
    assert wait_for(server.client(), second.json()["id"]).status == "cancelled"


def test_cancel_mid_run(server: Server, data_dir: Path) -> None:
    client = server.client()
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="conversations")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, extra_body={"max_steps": 5000})
    wait_for_event(client, job.id, "metrics")
    pid = _job_row(data_dir, job.id)["pid"]
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_for(client, job.id, timeout=30).status == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _job_row(data_dir: Path, job_id: str) -> dict:
    import sqlite3

    with sqlite3.connect(data_dir / "bentoservice.db") as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def test_bad_uploads(server: Server) -> None:
    client = server.client()
    bad = jsonl(CHATS[:2]) + b'\n{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}'
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert "line 3" in err.value.body["message"] and err.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="preference")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="batch")
    with pytest.raises(openai.APIStatusError) as big:
        client.files.create(file=("big.jsonl", jsonl(CHATS * 400)), purpose="fine-tune")
    assert big.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as empty:
        client.files.create(file=("empty.jsonl", b""), purpose="fine-tune")
    assert "empty" in empty.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    kept = client.files.create(file=("kept.jsonl", jsonl(CHATS)), purpose="fine-tune")
    assert client.files.delete(kept.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(kept.id)


def test_bad_job_bodies(server: Server) -> None:
    client = server.client()
    chats = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-missing")
    assert err.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=chats)
    with pytest.raises(openai.BadRequestError) as kind:
        client.fine_tuning.jobs.create(model="tiny", training_file=chats, method={"type": "dpo"})
    assert "preference" in kind.value.body["message"]
    with pytest.raises(openai.BadRequestError) as typo:
        client.fine_tuning.jobs.create(model="tiny", training_file=chats, extra_body={"epochz": 3})
    assert typo.value.body["param"] == "epochz"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="tiny", training_file=chats, extra_body={"General": {"lora_config": None}})
    with pytest.raises(openai.BadRequestError) as qlora:  # QLoRA needs a CUDA GPU: this machine has none
        client.fine_tuning.jobs.create(model="tiny", training_file=chats, extra_body={"load_in_4bit": True})
    assert qlora.value.body["param"] == "load_in_4bit" and "CUDA" in qlora.value.body["message"]
    for call in (client.fine_tuning.jobs.retrieve, client.fine_tuning.jobs.cancel, client.fine_tuning.jobs.list_events):
        with pytest.raises(openai.NotFoundError):
            call("ftjob-nope")
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def training_past_a_checkpoint(client: openai.OpenAI) -> tuple:
    """An uploaded file and a 60-step job on it, once the job has saved its first checkpoint."""
    uploaded = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=uploaded.id, extra_body={"max_steps": 60, "save_steps": 5}
    )
    wait_for_event(client, job.id, "checkpoint")
    return uploaded, job


def test_restart_mid_job_resumes(tiny, tmp_path: Path) -> None:
    env = {"BENTOSERVICE_DATA_DIR": str(tmp_path)}
    server = Server("tiny", env=env)
    try:
        client = server.client()
        uploaded, job = training_past_a_checkpoint(client)
        runner = _job_row(tmp_path, job.id)["pid"]
        os.killpg(runner, signal.SIGKILL)  # the machine goes down: server and runner together
        server.crash()
    finally:
        server.stop()
    server = Server("tiny", env=env)
    try:
        client = server.client()
        assert [f.id for f in client.files.list().data] == [uploaded.id]
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data]
        assert any("resumed" in m for m in messages)
        steps = [
            e.data["step"]
            for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=500).data)
            if e.type == "metrics"
        ]
        resumed_at = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
        assert steps[resumed_at] > 1, "training restarted from scratch instead of the checkpoint"
        assert done.fine_tuned_model in [m.id for m in client.models.list().data], messages
    finally:
        server.stop()


def test_bentoml_task_endpoint(server: Server) -> None:
    """BentoML's task client. Its SyncHTTPClient.submit raises AttributeError('_opened_files') in
    bentoml 1.4.39-1.4.40 (an upstream bug, after the task is created), so the async client drives it."""
    import asyncio

    import bentoml

    file_id = server.client().files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id

    async def finished(task) -> dict:
        """The task's result; BentoML registers a task's status a moment after accepting it."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if (await task.get_status()).value in ("completed", "failed", "canceled"):
                    return await task.get()
            except bentoml.exceptions.NotFound:
                pass
            await asyncio.sleep(1)
        raise TimeoutError("the task did not finish")

    async def run() -> tuple[dict, dict]:
        async with bentoml.AsyncHTTPClient(server.url, timeout=120) as client:
            task = await client.fine_tune.submit(job={"model": "tiny", "training_file": file_id, "max_steps": 2})
            refused = await client.fine_tune.submit(job={"model": "tiny", "training_file": "file-nope"})
            return await finished(task), await finished(refused)

    job, refused = asyncio.run(run())
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft:tiny:")
    assert refused["error"]["param"] == "training_file"


def test_python_client(server: Server, tmp_path: Path) -> None:
    import bentoservice

    client = bentoservice.Client(server.url)
    pairs = tmp_path / "preferences.jsonl"
    pairs.write_bytes(jsonl(PAIRS))
    with pairs.open("rb") as file:
        uploaded = client.files.create(file, purpose="preference")
    job = client.fine_tuning.create(
        model="tiny", training_file=uploaded["id"], loss="dpo", epochs=1, learning_rate=1e-5, beta=0.1, max_steps=2
    )
    done = client.fine_tuning.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["params"]["loss"] == "dpo"
    assert any("loss" in e["data"] for e in client.events.list(job_id=job["id"]))
    assert set(client.events.latest(["loss", "learning_rate"], job_id=job["id"])) == {"loss", "learning_rate"}
    with client.deploy(done["outputs"]["model"]) as openai_client:
        reply = openai_client.chat.completions.create(
            model=done["outputs"]["model"], max_tokens=3, messages=PAIRS[0]["prompt"]
        )
        assert reply.choices[0].message.content is not None
    chats = client.files.create(jsonl(CHATS), purpose="conversations")
    merged = client.fine_tuning.wait(
        client.fine_tuning.create(model="tiny", training_file=chats["id"], max_steps=2, merge_before_push=True)["id"],
        timeout=240,
    )
    assert merged["status"] == "succeeded", merged["error"]
    with client.deploy(merged["outputs"]["model"]) as openai_client:
        reply = openai_client.chat.completions.create(
            model=merged["outputs"]["model"], max_tokens=3, messages=CHATS[0]["messages"][:1]
        )
        assert reply.model == merged["outputs"]["model"] and reply.choices[0].message.content is not None
