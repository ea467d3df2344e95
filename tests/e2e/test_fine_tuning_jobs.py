"""A fine-tuning job in OpenAI's full shape, through the openai SDK: metric names, result files, estimated_finish,
seed and metadata, pause and resume (across a restart)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import Server
from test_fine_tuning import CHATS, PAIRS, _job_row, jsonl, wait_for, wait_for_event

import bentoservice


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ft-jobs")


@pytest.fixture(scope="module")
def server(tiny, data_dir: Path):
    server = Server("tiny", env={"BENTOSERVICE_DATA_DIR": str(data_dir)})
    yield server
    server.stop()


def test_openai_job_shape(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
    valid = client.files.create(file=("valid.jsonl", jsonl(CHATS[:3])), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        seed=7,
        metadata={"team": "search"},
        hyperparameters={"n_epochs": "auto", "batch_size": 2, "learning_rate_multiplier": "auto"},
        extra_body={"max_steps": 4, "save_steps": 2, "evaluation": {"max_tokens": 6}},
    )
    assert (job.hyperparameters.n_epochs, job.hyperparameters.learning_rate_multiplier) == (3, 1.0)
    assert job.seed == 7 and job.metadata == {"team": "search"}
    other = client.fine_tuning.jobs.create(model="tiny", training_file=train, metadata={"team": "ads"})
    client.fine_tuning.jobs.cancel(other.id)
    assert isinstance(client.fine_tuning.jobs.retrieve(other.id).seed, int)  # chosen and shown when not given
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"}).data] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "ads"}).data] == [other.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "nobody"}).data == []

    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.trained_tokens and done.trained_tokens > 0 and done.estimated_finish is None
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data if e.type == "metrics"]
    train_steps = [e for e in events if "train_loss" in e and "loss" in e]
    assert sorted(e["step"] for e in train_steps) == [1, 2, 3, 4]
    assert all(0 <= e["train_mean_token_accuracy"] <= 1 and e["train_loss"] == e["loss"] for e in train_steps)
    assert {e["step"] for e in events if "valid_loss" in e and "valid_mean_token_accuracy" in e} >= {2, 4}
    full = [e for e in events if "full_valid_loss" in e]
    assert len(full) == 1 and full[0]["full_valid_loss"] > 0 and 0 <= full[0]["full_valid_mean_token_accuracy"] <= 1
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    assert checkpoints[0].metrics.train_loss > 0 and checkpoints[0].metrics.valid_loss > 0
    assert 0 <= checkpoints[0].metrics.valid_mean_token_accuracy <= 1

    assert len(done.result_files) == 2
    results = client.files.retrieve(done.result_files[0])
    assert results.purpose == "fine-tune-results" and results.filename == "step_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(client.files.content(results.id).text)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[0]["train_loss"]) == pytest.approx(next(e["loss"] for e in train_steps if e["step"] == 1))
    assert rows[1]["valid_loss"] and not rows[0]["valid_loss"]


LONG = {"max_steps": 150, "save_steps": 1000}


def test_pause_resume_across_a_restart(tiny, tmp_path: Path) -> None:
    env = {"BENTOSERVICE_DATA_DIR": str(tmp_path)}
    server = Server("tiny", env=env)
    try:
        client = server.client()
        train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="tiny", training_file=train, seed=11, extra_body=LONG)
        with pytest.raises(openai.BadRequestError) as early:
            client.fine_tuning.jobs.resume(job.id)
        assert early.value.body["param"] == "fine_tuning_job_id"
        wait_for_event(client, job.id, "metrics")
        running = client.fine_tuning.jobs.retrieve(job.id)
        while running.estimated_finish is None and running.status == "running":
            time.sleep(0.2)
            running = client.fine_tuning.jobs.retrieve(job.id)
        assert running.status == "running" and running.estimated_finish >= running.created_at
        pid = _job_row(tmp_path, job.id)["pid"]
        assert client.fine_tuning.jobs.pause(job.id).id == job.id
        paused = wait_for(client, job.id, ("paused", "succeeded", "failed"), timeout=60)
        assert paused.status == "paused" and paused.estimated_finish is None
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the runner still holds the device after the pause"
        at_pause = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
        assert 0 < at_pause < 150
    finally:
        server.stop()
    server = Server("tiny", env=env)
    try:
        client = server.client()
        time.sleep(2)  # a few queue ticks: a paused job stays paused after a restart
        assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
        assert client.fine_tuning.jobs.resume(job.id).status == "queued"
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data))
        resumed = next(i for i, e in enumerate(events) if e.message.startswith("Fine-tuning job resumed"))
        losses = {e.data["step"]: e.data["loss"] for e in events[resumed:] if e.type == "metrics" and "loss" in e.data}
        assert min(losses) == at_pause + 1 and max(losses) == 150
        # The same run without the pause: from the checkpoint on, the same batches, optimizer and scheduler state
        # give the same losses.
        straight = wait_for(
            client, client.fine_tuning.jobs.create(model="tiny", training_file=train, seed=11, extra_body=LONG).id
        )
        assert straight.status == "succeeded", straight.error
        reference = {
            e.data["step"]: e.data["loss"]
            for e in client.fine_tuning.jobs.list_events(straight.id, limit=1000).data
            if e.type == "metrics" and "loss" in e.data and e.data["step"] in losses
        }
        assert reference == pytest.approx(losses, rel=1e-4)
        with pytest.raises(openai.BadRequestError):
            client.fine_tuning.jobs.pause(job.id)
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_before_after_evaluation(server: Server) -> None:
    """The job of test_openai_job_shape compared the base and the adapter on its validation file."""
    client = server.client()
    job = client.fine_tuning.jobs.list(metadata={"team": "search"}).data[0]
    summary = job.model_extra["evaluation"]
    assert summary["base"]["loss"] > 0 and summary["adapter"]["loss"] > 0
    assert summary["base"]["loss"] != summary["adapter"]["loss"]
    assert summary["adapter"]["loss"] == pytest.approx(
        next(
            e.data["full_valid_loss"]
            for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data
            if "full_valid_loss" in e.data
        )
    )
    assert [s["prompt"] for s in summary["samples"]] == [c["messages"][0]["content"] for c in CHATS[:3]]
    assert [s["reference"] for s in summary["samples"]] == [c["messages"][1]["content"] for c in CHATS[:3]]
    assert all(isinstance(s["base"], str) and isinstance(s["adapter"], str) for s in summary["samples"])
    stored = client.files.retrieve(job.result_files[1])
    assert stored.filename == "evaluation.json" and stored.purpose == "fine-tune-results"
    assert json.loads(client.files.content(stored.id).text) == summary
    final = [
        e for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data if e.message.startswith("Evaluation:")
    ]
    assert len(final) == 1 and final[0].data["evaluation"] == summary and "(base) ->" in final[0].message
    train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as missing:
        client.fine_tuning.jobs.create(
            model="tiny", training_file=train, extra_body={"evaluation": {"prompts_file": "file-nope"}}
        )
    assert missing.value.body["param"] == "evaluation.prompts_file"
    with pytest.raises(openai.BadRequestError) as typo:
        client.fine_tuning.jobs.create(model="tiny", training_file=train, extra_body={"evaluation": {"max_token": 3}})
    assert "max_token" in typo.value.body["param"]


def test_dpo_evaluation_has_preference_accuracy(server: Server) -> None:
    client = server.client()
    pairs = client.files.create(file=("pairs.jsonl", jsonl(PAIRS)), purpose="preference").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=pairs,
        validation_file=pairs,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}},
        extra_body={"max_steps": 1, "evaluation": {"max_tokens": 4, "samples": 1}},
    )
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    summary = done.model_extra["evaluation"]
    assert 0 <= summary["adapter"]["preference_accuracy"] <= 1 and summary["adapter"]["loss"] > 0
    assert summary["base"]["loss"] > 0
    assert [s["reference"] for s in summary["samples"]] == [PAIRS[0]["chosen"][-1]["content"]]


def test_wandb_integration(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        extra_body={"max_steps": 2},
        integrations=[{"type": "wandb", "wandb": {"project": "bentoservice-tests", "tags": ["ci"]}}],
    )
    assert job.integrations[0].wandb.project == "bentoservice-tests" and job.integrations[0].wandb.run_id == job.id
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    written = [
        e.data["wandb_run_dir"]
        for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data
        if "wandb_run_dir" in e.data
    ]
    assert len(written) == 1 and Path(written[0]).parent.parent == Path(done.integrations[0].wandb.model_extra["dir"])
    logs = list(Path(written[0]).glob("*.wandb"))
    assert logs and logs[0].stat().st_size > 0 and Path(written[0]).name.startswith("offline-run-")
    with pytest.raises(openai.BadRequestError) as other:
        client.fine_tuning.jobs.create(
            model="tiny", training_file=train, integrations=[{"type": "mlflow", "mlflow": {}}]
        )  # type: ignore[list-item]
    assert other.value.body["param"].startswith("integrations")


def test_openweights_fields(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="conversations").id
    for field, value in (
        ("is_peft", False),
        ("train_on_responses_only", False),
        ("optim", "adam"),
        ("finetuned_model_id", "me/model"),
        ("use_rslora", True),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", training_file=train, extra_body={field: value})
        assert err.value.body["param"] == field, field
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        extra_body={
            "loss": "sft",
            "optim": "sgd",
            "weight_decay": 0.01,
            "lr_scheduler_type": "constant",
            "lora_bias": "none",
            "meta": {"experiment": 3},
            "max_steps": 500,
        },
    )
    client.fine_tuning.jobs.cancel(job.id)
    params = job.model_extra["params"]
    assert (params["optim"], params["weight_decay"], params["lr_scheduler_type"]) == ("sgd", 0.01, "constant")
    assert params["meta"] == {"experiment": 3}


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bentoservice.cli", "fine-tune", *args, "--url", server.url],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_follows_a_job_and_shows_its_evaluation(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train, extra_body={"max_steps": 3})
    followed = _cli(server, "follow", job.id, "--poll", "0.2")
    assert followed.returncode == 0, followed.stderr
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert followed.stdout.strip() == f"{job.id} succeeded after 3/3 steps: {done.fine_tuned_model}"
    assert "3/3" in followed.stderr and "loss=" in followed.stderr  # the bar, on stderr
    assert "Training completed" in followed.stderr  # the job's other events, as lines above the bar

    cancelled = client.fine_tuning.jobs.create(model="tiny", training_file=train, extra_body={"max_steps": 500})
    client.fine_tuning.jobs.cancel(cancelled.id)
    stopped = _cli(server, "follow", cancelled.id)
    assert stopped.returncode == 1 and stopped.stdout.startswith(f"{cancelled.id} cancelled after ")
    missing = _cli(server, "get", "ftjob-nope")
    assert missing.returncode == 1 and "ftjob-nope" in missing.stderr

    evaluated = client.fine_tuning.jobs.list(metadata={"team": "search"}).data[0]
    shown = _cli(server, "get", evaluated.id)
    assert shown.returncode == 0, shown.stderr
    summary = evaluated.model_extra["evaluation"]
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:2] == [evaluated.id, "succeeded"]
    loss = next(line for line in lines if line.strip("│ ").startswith("loss "))
    assert f"{summary['base']['loss']:.4f}" in loss and f"{summary['adapter']['loss']:.4f}" in loss
    assert "Greedy generations, side by side" in shown.stdout
    assert all(s["prompt"] in shown.stdout for s in summary["samples"])


def test_cli_creates_a_job_and_follows_it(server: Server, tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_bytes(jsonl(CHATS))
    created = _cli(
        server,
        "create",
        "tiny",
        str(chats),
        "--validation-file",
        str(chats),
        "--batch-size",
        "2",
        "--suffix",
        "cli",
        "--seed",
        "3",
        "--body",
        json.dumps({"max_steps": 3, "evaluation": {"max_tokens": 2, "samples": 1}}),
        "--follow",
        "--poll",
        "0.2",
    )
    assert created.returncode == 0, created.stderr
    job_id, final = created.stdout.strip().splitlines()
    client = server.client()
    done = client.fine_tuning.jobs.retrieve(job_id)
    assert final == f"{job_id} succeeded after 3/3 steps: {done.fine_tuned_model}"
    assert done.fine_tuned_model.startswith("ft:tiny:cli:") and done.seed == 3
    assert done.hyperparameters.batch_size == 2 and done.model_extra["evaluation"]["samples"]
    uploaded = client.files.retrieve(done.training_file)
    assert uploaded.filename == "chats.jsonl" and done.validation_file.startswith("file-")
    assert "3/3" in created.stderr and "loss=" in created.stderr  # the live bar, on stderr

    dpo = _cli(server, "create", "tiny", done.training_file, "--method", "dpo", "--n-epochs", "0")
    assert dpo.returncode == 1 and "method.dpo.hyperparameters.n_epochs" in dpo.stderr  # the server's 400
    assert _cli(server, "create", "tiny", str(tmp_path / "missing.jsonl")).returncode == 2
    assert _cli(server, "create", "tiny", done.training_file, "--body", "[1]").returncode == 2


def test_python_client_bar_and_trackio(server: Server, capfd: pytest.CaptureFixture[str]) -> None:
    client = bentoservice.Client(server.url)
    train = client.files.create(jsonl(CHATS), purpose="fine-tune")["id"]
    job = client.fine_tuning.create(
        model="tiny",
        training_file=train,
        max_steps=2,
        integrations=[{"type": "trackio", "trackio": {"project": "bentoservice-tests"}}],
    )
    done = client.fine_tuning.wait(job["id"], poll=0.2)
    assert done["status"] == "succeeded", done["error"]
    bar = capfd.readouterr().err
    assert f"{job['id']}: 100%" in bar and "2/2" in bar
    folder = Path(done["integrations"][0]["trackio"]["dir"])
    assert done["integrations"][0]["type"] == "trackio" and folder.parent.name == job["id"]
    written = [e["data"]["trackio_dir"] for e in client.events.list(job["id"]) if "trackio_dir" in e["data"]]
    assert written == [str(folder)]
    runs = list(folder.glob("bentoservice-tests.db"))
    assert runs and runs[0].stat().st_size > 0
    with pytest.raises(openai.BadRequestError) as empty:
        client.fine_tuning.create(
            model="tiny", training_file=train, integrations=[{"type": "trackio", "trackio": {"project": ""}}]
        )
    assert empty.value.body["param"].startswith("integrations")

    evaluated = client.openai.fine_tuning.jobs.list(metadata={"team": "search"}).data[0]
    client.fine_tuning.show(evaluated.id)
    shown = capfd.readouterr().out
    assert shown.startswith(f"{evaluated.id}  succeeded") and "Held-out figures" in shown
    assert f"{evaluated.model_extra['evaluation']['adapter']['loss']:.4f}" in shown
