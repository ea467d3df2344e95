"""Issue 18: schemathesis against the real server's OpenAPI document, every /v1 operation, with requests that fit
the schema and requests that break it. Every answer must be one the document declares: no 5xx, a status code the
operation lists, its content type, and a body that matches the declared schema (errors: OpenAI's envelope).
Bounded and derandomized (the same cases each run) to fit the suite's budget; `make fuzz` is the longer run
(FUZZ_EXAMPLES per operation)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import Server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_adapters import make_adapter
from test_fine_tuning import CHATS, jsonl, wait_for, wait_for_event

ADMIN = "sk-fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def server(tiny, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data: Path = tmp_path_factory.mktemp("fuzz-data")
    adapters = tmp_path_factory.mktemp("fuzz-adapters")
    make_adapter(adapters / "fz", tiny_dir, seed=1)
    env = {"BENTOSERVICE_DATA_DIR": str(data), "BENTOSERVICE_ADAPTER_DIRS": str(adapters)}
    server = Server("tiny", "--api-key", ADMIN, env=env)
    server.adapter = str(adapters / "fz")  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schema(server: Server) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json", headers=HEADERS, timeout=30)


def _problems(case: Case, base_url: str) -> tuple[int, str | None]:
    """The answer's status, and how it breaks the document (None: it does not)."""
    response = case.call(base_url=base_url, headers=HEADERS, timeout=120)
    try:
        case.validate_response(response, checks=CHECKS, headers=HEADERS)
    except FailureGroup as group:
        return response.status_code, str(group)
    return response.status_code, None


def test_every_answer_is_one_the_document_declares(server: Server, schema: BaseSchema) -> None:
    base_url = f"{server.url}/v1"
    operations: list[str] = []
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Case) -> None:
                _, problem = _problems(case, base_url)
                if problem:
                    failures.append(problem)

            try:
                run()
            except Unsatisfiable:  # nothing of this operation's request can be made invalid (no body or query)
                assert mode is GenerationMode.NEGATIVE
    assert len(operations) >= 20, operations  # the whole API was reached, not an empty document
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])


def test_what_succeeds_matches_the_declared_schema(server: Server, schema: BaseSchema) -> None:
    """Generated requests rarely name a served model or an existing job: these do, one or more per operation, so
    that the successful answers (OpenAI's SDK types, api/responses.py) are checked against the document too."""
    client = server.client(ADMIN)
    upload = client.files.create(file=("chats.jsonl", jsonl(CHATS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=upload.id, extra_body={"max_steps": 40, "save_steps": 2}
    )
    wait_for_event(client, job.id, "checkpoint")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    grader = {
        "type": "string_check",
        "name": "same",
        "input": "{{sample.output_text}}",
        "reference": "a",
        "operation": "eq",
    }
    file_path, job_path = {"file_id": upload.id}, {"job_id": job.id}
    cases: list[tuple[str, str, dict, int]] = [
        ("GET", "/models", {}, 200),
        ("GET", "/models/{model_id}", {"path_parameters": {"model_id": "tiny"}}, 200),
        ("POST", "/chat/completions", {"body": chat}, 200),
        ("POST", "/chat/completions", {"body": {**chat, "n": 2, "logprobs": True, "top_logprobs": 2}}, 200),
        ("POST", "/chat/completions", {"body": {**chat, "stream": True}}, 200),
        ("POST", "/chat/completions", {"body": {**chat, "model": "fz"}}, 200),
        ("POST", "/completions", {"body": {"model": "tiny", "prompt": "hi", "max_tokens": 3, "logprobs": 2}}, 200),
        ("POST", "/completions", {"body": {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3}}, 200),
        ("POST", "/completions", {"body": {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}}, 200),
        ("GET", "/chat_templates", {}, 200),
        ("POST", "/chat_templates", {"body": {"name": "fz", "template": "{{ messages[0].content }}"}}, 200),
        ("POST", "/chat_templates", {"body": {"name": "fz", "template": "{{ 1 }}"}}, 409),
        ("POST", "/worker_get_conversation_template", {"body": {}}, 200),
        ("POST", "/load_lora_adapter", {"body": {"lora_name": "fz2", "lora_path": server.adapter}}, 200),
        ("POST", "/adapters/load", {"body": {"adapter_id": server.adapter, "adapter_name": "fz3"}}, 200),
        ("GET", "/adapters", {}, 200),
        ("POST", "/adapters", {"body": {"adapter_name": "fz3"}}, 200),
        ("POST", "/adapters", {"body": {"adapter_name": None}}, 200),
        ("POST", "/adapters/unload", {"body": {"adapter_name": "fz3"}}, 200),
        ("POST", "/unload_lora_adapter", {"body": {"lora_name": "fz2"}}, 200),
        ("POST", "/embeddings", {"body": {"model": "minilm", "input": ["hi", "there"]}}, 200),
        ("POST", "/embeddings", {"body": {"model": "minilm", "input": "hi", "encoding_format": "base64"}}, 200),
        ("POST", "/rerank", {"body": {"query": "hi", "documents": ["a", "b"]}}, 404),  # no rerank model served
        (
            "POST",
            "/files",
            {"body": {"file": jsonl(CHATS), "purpose": "fine-tune"}, "media_type": "multipart/form-data"},
            200,
        ),
        ("POST", "/fine_tuning/jobs", {"body": {"model": "tiny", "training_file": upload.id, "max_steps": 1}}, 200),
        ("GET", "/files", {}, 200),
        ("GET", "/files", {"query": {"purpose": "fine-tune"}}, 200),
        ("GET", "/files/{file_id}", {"path_parameters": file_path}, 200),
        ("GET", "/files/{file_id}/content", {"path_parameters": file_path}, 200),
        ("GET", "/fine_tuning/jobs", {"query": {"limit": 5}}, 200),
        ("GET", "/fine_tuning/jobs/{job_id}", {"path_parameters": job_path}, 200),
        ("GET", "/fine_tuning/jobs/{job_id}/events", {"path_parameters": job_path}, 200),
        ("GET", "/fine_tuning/jobs/{job_id}/checkpoints", {"path_parameters": job_path}, 200),
        ("POST", "/fine_tuning/jobs/retrieve", {"body": {"fine_tuning_job_id": job.id}}, 200),
        ("POST", "/finetune/list_checkpoints", {"body": {"fine_tuning_job_id": job.id}}, 200),
        ("POST", "/fine_tuning/alpha/graders/validate", {"body": {"grader": grader}}, 200),
        ("POST", "/fine_tuning/alpha/graders/run", {"body": {"grader": grader, "model_sample": "a"}}, 200),
    ]
    failures: list[str] = []
    answered: set[str] = set()

    def check(method: str, path: str, kwargs: dict, expected: int) -> None:
        status, problem = _problems(schema[path][method].Case(**kwargs), f"{server.url}/v1")
        answered.add(f"{method} {path}")
        if status != expected or problem:
            failures.append(f"{method} {path} {kwargs}: {status}, expected {expected}\n{problem or ''}")

    for case in cases:
        check(*case)
    # A job through its states: paused, queued again, cancelled, and then neither.
    check("POST", "/fine_tuning/jobs/{job_id}/pause", {"path_parameters": job_path}, 200)
    wait_for(client, job.id, ("paused",))
    check("POST", "/fine_tuning/jobs/{job_id}/resume", {"path_parameters": job_path}, 200)
    check("POST", "/fine_tuning/jobs/{job_id}/cancel", {"path_parameters": job_path}, 200)
    wait_for(client, job.id, ("cancelled",))
    check("POST", "/fine_tuning/jobs/cancel", {"body": {"fine_tuning_job_id": job.id}}, 400)
    check("POST", "/fine_tuning/jobs/{job_id}/resume", {"path_parameters": job_path}, 400)
    check("DELETE", "/files/{file_id}", {"path_parameters": file_path}, 200)
    assert answered == {op.ok().label for op in schema.get_all_operations()}
    assert not failures, "\n".join(failures)
