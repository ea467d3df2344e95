"""Reinforcement fine-tuning (OpenAI's method type "reinforcement") through the openai SDK: a string_check grader on
a tiny model, its reward events, its adapter served at ft:... with a higher held-out reward than the base; bad
grader, data and hyperparameters are 400s.

The tiny model leans towards two answers, "Yes" and "No" (conftest's make_tiny_model): its samples say "Yes" about a
third of the time, so a grader rewarding "Yes" gives GRPO something to learn from in a few steps."""

from __future__ import annotations

import csv
import io
import statistics
import time

import openai
import pytest
from conftest import Server, make_tiny_model
from test_fine_tuning import jsonl, wait_for, wait_for_event

from bentoservice import store

PROMPTS = [
    {"messages": [{"role": "user", "content": f"Say the word {w}."}], "word": w}
    for w in ("apple", "river", "candle", "pepper", "silver", "tiger")
]
GRADER = {
    "type": "string_check",
    "name": "has_word",
    "input": "{{sample.output_text}}",
    "reference": "{{item.word}}",
    "operation": "ilike",
}


MODEL = "tiny-yes"
SAYS_YES = {
    "type": "string_check",
    "name": "says_yes",
    "input": "{{sample.output_text}}",
    "reference": "Yes",
    "operation": "like",
}


def fruit(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Is {word} a fruit?"}]}


TRAIN = [fruit(w) for w in ("apple", "river", "candle", "pepper", "silver", "tiger", "garden", "window")]
HELD_OUT = [fruit(w) for w in ("cloud", "stone", "horse", "paper")]


@pytest.fixture(scope="module")
def server(smollm2: store.StoredModel, tmp_path_factory: pytest.TempPathFactory):
    folder = make_tiny_model(tmp_path_factory.mktemp(MODEL), smollm2.path, leaning={"Yes": 8.0, "No": -8.0})
    store.import_model(MODEL, str(folder))
    server = Server(MODEL, env={"BENTOSERVICE_DATA_DIR": str(tmp_path_factory.mktemp("rft"))})
    yield server
    server.stop()


def test_reinforcement_job_trains_an_adapter_that_answers(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("prompts.jsonl", jsonl(PROMPTS)), purpose="fine-tune")
    assert train.model_extra["format"] == "openai_prompts"
    valid = client.files.create(file=("valid.jsonl", jsonl(PROMPTS[:2])), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        validation_file=valid,
        suffix="rft",
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": GRADER,
                "hyperparameters": {"batch_size": 2, "compute_multiplier": 0.5, "eval_interval": 2, "eval_samples": 2},
            },
        },
        extra_body={"max_steps": 2, "max_completion_tokens": 8},
    )
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.name == "has_word"
    hyper = job.method.reinforcement.hyperparameters
    assert (hyper.batch_size, hyper.compute_multiplier, hyper.eval_interval, hyper.eval_samples) == (2, 0.5, 2, 2)
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data if e.type == "metrics"]
    trained = [e for e in events if "train_reward_mean" in e]
    assert sorted(e["step"] for e in trained) == [1, 2]
    assert all(
        0 <= e["train_reward_mean"] <= 1 and e["train_grader_has_word_mean"] == e["train_reward_mean"] for e in trained
    )
    valid_steps = {e["step"] for e in events if "valid_reward_mean" in e}
    assert {0, 2} <= valid_steps  # the base's held-out reward, then after training
    assert any("full_valid_reward_mean" in e for e in events)
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "Say the word apple."}]
    )
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:rft:") and reply.choices[0].message.content is not None
    assert all(e["grader_errors"] == 0 for e in events if "reward" in e or "eval_reward" in e)
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert list(rows[0]) == [
        *("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"),
        *("train_reward_mean", "valid_reward_mean", "grader_errors"),
        *("train_grader_has_word_mean", "valid_grader_has_word_mean"),
    ]
    by_step = {int(r["step"]): r for r in rows}
    assert float(by_step[1]["train_reward_mean"]) == next(e["train_reward_mean"] for e in trained if e["step"] == 1)
    assert by_step[0]["valid_reward_mean"] and not by_step[0]["train_reward_mean"]


def held_out_reward(client: openai.OpenAI, model: str) -> float:
    """The mean reward of `model`'s sampled answers to the held-out prompts (4 each, each with a seed of its own: the
    random model's answers to the prompts differ little, so one seed would sample them alike), graded by the server."""
    rewards = []
    for i, prompt in enumerate(HELD_OUT):
        for seed in range(4 * i, 4 * i + 4):
            reply = client.chat.completions.create(
                model=model, messages=prompt["messages"], max_tokens=4, temperature=1.0, seed=seed
            )
            sample = reply.choices[0].message.content or ""
            rewards.append(client.fine_tuning.alpha.graders.run(grader=SAYS_YES, model_sample=sample).reward)
    return statistics.mean(rewards)


def test_reinforcement_raises_the_held_out_reward(server: Server) -> None:
    client = server.client()
    before = held_out_reward(client, MODEL)
    train = client.files.create(file=("train.jsonl", jsonl(TRAIN)), purpose="fine-tune").id
    valid = client.files.create(file=("held-out.jsonl", jsonl(HELD_OUT)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train,
        validation_file=valid,
        seed=0,
        suffix="yes",
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": SAYS_YES, "hyperparameters": {"batch_size": 4}},
        },
        extra_body={"max_steps": 3, "max_completion_tokens": 4, "learning_rate": 5e-3},
    )
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    events = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data if e.type == "metrics"]
    base = next(e["valid_reward_mean"] for e in events if e["step"] == 0 and "valid_reward_mean" in e)
    final = next(e["full_valid_reward_mean"] for e in events if "full_valid_reward_mean" in e)
    after = held_out_reward(client, done.fine_tuned_model)
    assert final > base and after > before, (base, final, before, after)


def python_grader(body: str) -> dict:
    return {"type": "python", "name": "py", "source": f"def grade(sample, item):\n    {body}"}


def reinforce(client: openai.OpenAI, grader: dict, **extra: object):
    """A job over all the prompts in one step, 2 completions each."""
    train = client.files.create(file=("prompts.jsonl", jsonl(PROMPTS)), purpose="fine-tune").id
    return client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 6, "compute_multiplier": 0.5}},
        },
        extra_body={"max_completion_tokens": 4, **extra},
    )


def test_a_failed_grade_scores_0_and_is_counted(server: Server) -> None:
    client = server.client()
    grader = python_grader(
        "if item['word'] in ('apple', 'river'):\n        raise ValueError('no fruit')\n    return 1.0"
    )
    done = wait_for(client, reinforce(client, grader, max_steps=1).id)
    assert done.status == "succeeded", done.error
    (step,) = [e.data for e in client.fine_tuning.jobs.list_events(done.id).data if "reward" in (e.data or {})]
    # 2 of the 6 prompts' grades fail, each of their 2 completions scored 0; the other 8 score 1
    assert step["grader_errors"] == 4 and step["train_reward_mean"] == pytest.approx(8 / 12)


def test_pause_resume_and_cancel_a_reinforcement_job(server: Server) -> None:
    client = server.client()
    job = reinforce(client, GRADER, max_steps=500, save_steps=1000)
    wait_for_event(client, job.id, "metrics")
    client.fine_tuning.jobs.pause(job.id)
    assert wait_for(client, job.id, ("paused", "succeeded", "failed"), timeout=60).status == "paused"
    at_pause = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [
            e.data["step"]
            for e in client.fine_tuning.jobs.list_events(job.id, limit=20).data
            if "reward" in (e.data or {})
        ]
        if max(steps) > at_pause:
            break
        time.sleep(0.5)
    assert max(steps) > at_pause, "the resumed job trained no further step"
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_for(client, job.id, timeout=60).status == "cancelled"


@pytest.mark.parametrize(
    ("method", "extra", "param"),
    [
        ({"grader": {**GRADER, "type": "regex"}}, {}, "method.reinforcement.grader"),
        ({"grader": {**GRADER, "reference": "{{item.answer}}"}}, {}, "training_file"),
        ({"grader": GRADER, "hyperparameters": {"compute_multiplier": 0}}, {}, "method.reinforcement"),
        (
            {"grader": GRADER, "hyperparameters": {"eval_interval": 2}},
            {},
            "method.reinforcement.hyperparameters.eval_interval",
        ),
        (
            {"grader": GRADER, "hyperparameters": {"reasoning_effort": "high"}},
            {},
            "method.reinforcement.hyperparameters.reasoning_effort",
        ),
        ({"grader": GRADER, "response_format": {"type": "json_object"}}, {}, "method.reinforcement.response_format"),
        ({"grader": GRADER}, {"evaluation": {"samples": 2}}, "evaluation"),
    ],
    ids=[
        "unknown-grader-type",
        "missing-item-field",
        "compute-multiplier",
        "eval-without-validation",
        "reasoning",
        "response-format",
        "evaluation-block",
    ],
)
def test_bad_reinforcement_jobs_are_400s(server: Server, method: dict, extra: dict, param: str) -> None:
    client = server.client()
    train = client.files.create(file=("prompts.jsonl", jsonl(PROMPTS)), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train,
            method={"type": "reinforcement", "reinforcement": method},
            extra_body=extra,
        )
    assert err.value.body["param"].startswith(param), err.value.body
    if param == "training_file":
        assert "line 1" in err.value.body["message"] and "item.answer" in err.value.body["message"]
