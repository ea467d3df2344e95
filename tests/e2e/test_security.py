"""Issue 18: every route behind a key (inference and admin keys), bad input answered 4xx with `param`, bodies
counted as they stream, sandboxed chat templates, strict types at the edges, an OpenAPI document that declares
the errors. One real server with all three kinds of key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server

from bentoservice.config import Settings

ADMIN, INFERENCE, LEGACY = "sk-admin-1", "sk-infer-1", "sk-legacy"
CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
    for w in ("red", "green", "blue", "gold")
]


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("# role key\nadmin sk-admin-2\ninference sk-infer-2\n")
    server = Server(
        "tiny",
        "--api-key",
        LEGACY,
        "--chat-template",
        "chatml",
        env={
            "BENTOSERVICE_ADMIN_API_KEYS": ADMIN,
            "BENTOSERVICE_INFERENCE_API_KEYS": INFERENCE,
            "BENTOSERVICE_API_KEYS_FILE": str(keys),
            "BENTOSERVICE_MAX_REQUEST_BYTES": "20000",
            "BENTOSERVICE_MAX_FILE_BYTES": "100000",
            "BENTOSERVICE_MAX_OUTPUT_TOKENS": "40",
            "BENTOSERVICE_MAX_CHOICES": "3",
            "BENTOSERVICE_DATA_DIR": str(tmp_path_factory.mktemp("security-data")),
        },
    )
    yield server
    server.stop()


def call(server: Server, method: str, path: str, key: str | None = ADMIN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(
        method, f"{server.url}{path}", headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs
    )


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TASK_ROUTES = [
    ("POST", "/fine_tune/submit", {"json": {"job": {"model": "tiny", "training_file": "file-x"}}}),
    ("GET", "/fine_tune/status", {"params": {"task_id": "x"}}),
    ("GET", "/fine_tune/get", {"params": {"task_id": "x"}}),
    ("PUT", "/fine_tune/cancel", {"params": {"task_id": "x"}}),
    ("POST", "/fine_tune/retry", {"params": {"task_id": "x"}}),
    ("GET", "/docs.json", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), TASK_ROUTES, ids=[p for _, p, _ in TASK_ROUTES])
def test_bentoml_routes_need_an_admin_key(server: Server, method: str, path: str, kwargs: dict) -> None:
    assert error(call(server, method, path, None, **kwargs), 401)["code"] == "invalid_api_key"
    assert error(call(server, method, path, "sk-wrong", **kwargs), 401)["code"] == "invalid_api_key"
    assert error(call(server, method, path, INFERENCE, **kwargs), 403)["code"] == "insufficient_permissions"
    assert call(server, method, path, ADMIN, **kwargs).status_code not in (401, 403)


def test_probes_stay_open(server: Server) -> None:
    for path in ("/readyz", "/livez", "/metrics"):
        assert call(server, "GET", path, None).status_code == 200


INFERENCE_ROUTES = [
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": CHAT}),
    ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "hi", "max_tokens": 2}}),
    ("POST", "/v1/embeddings", {"json": {"model": "minilm", "input": "hi"}}),
    ("GET", "/v1/chat_templates", {}),
]
ADMIN_ROUTES = [
    ("GET", "/v1/files", {}),
    ("GET", "/v1/fine_tuning/jobs", {}),
    ("POST", "/v1/fine_tuning/jobs/cancel", {"json": {"fine_tuning_job_id": "ftjob-x"}}),
    ("GET", "/v1/adapters", {}),
    ("POST", "/v1/adapters/unload", {"json": {"adapter_name": "x"}}),
    ("POST", "/v1/unload_lora_adapter", {"json": {"lora_name": "x"}}),
    ("POST", "/v1/chat_templates", {"json": {"name": "t", "template": "{{ 1 }}", "override": True}}),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    INFERENCE_ROUTES + ADMIN_ROUTES,
    ids=[f"{m} {p}" for m, p, _ in INFERENCE_ROUTES + ADMIN_ROUTES],
)
def test_which_key_may_call_what(server: Server, method: str, path: str, kwargs: dict) -> None:
    admin_only = (method, path, kwargs) in ADMIN_ROUTES
    assert error(call(server, method, path, None, **kwargs), 401)["type"] == "authentication_error"
    for key in (ADMIN, LEGACY, "sk-admin-2"):  # the settings list, BENTOSERVICE_API_KEY, the keys file
        assert call(server, method, path, key, **kwargs).status_code not in (401, 403)
    for key in (INFERENCE, "sk-infer-2"):
        answer = call(server, method, path, key, **kwargs)
        if admin_only:
            assert error(answer, 403)["type"] == "permission_error"
        else:
            assert answer.status_code == 200, answer.text


def test_keys_are_never_printed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("admin from-file\ninference inf-file\n")
    settings = Settings(api_key="legacy", admin_api_keys="a1, a2", inference_api_keys="i1", api_keys_file=keys)
    assert settings.admin_keys() == ["legacy", "a1", "a2", "from-file"]
    assert settings.inference_keys() == ["i1", "inf-file"]
    assert not any(secret in repr(settings) for secret in ("legacy", "a1", "i1"))
    keys.write_text("owner x\n")
    with pytest.raises(ValueError, match="keys:1"):
        settings.admin_keys()


SPIN = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
SURROGATE = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'
BAD_INPUTS = [
    ("huge seed", "/v1/chat/completions", {"json": {**CHAT, "seed": 2**70}}, "seed"),
    ("lone surrogate", "/v1/chat/completions", {"content": SURROGATE}, "messages.0.content"),
    ("out-of-vocab token id", "/v1/completions", {"json": {"model": "tiny", "prompt": [10**9]}}, "prompt"),
    ("negative token id", "/v1/completions", {"json": {"model": "tiny", "prompt": [-1]}}, "prompt"),
    ("empty prompt", "/v1/completions", {"json": {"model": "tiny", "prompt": ""}}, "prompt"),
    ("adapter id with : and /", "/v1/adapters/load", {"json": {"adapter_id": "x:y/z"}}, "adapter_id"),
    (
        "lora_path URL",
        "/v1/load_lora_adapter",
        {"json": {"lora_name": "x", "lora_path": "file:///etc/passwd"}},
        "lora_path",
    ),
    (
        "override: 0",
        "/v1/chat_templates",
        {"json": {"name": "chatml", "template": "{{ 1 }}", "override": 0}},
        "override",
    ),
    (
        "sandbox escape",
        "/v1/chat_templates",
        {"json": {"name": "evil", "template": '{{ cycler.__init__.__globals__.os.popen("id").read() }}'}},
        "template",
    ),
    ("template over the size limit", "/v1/chat_templates", {"json": {"name": "big", "template": "x" * 70000}}, None),
    (
        "template that loops without output",
        "/v1/chat_templates",
        {"json": {"name": "spin", "template": SPIN}},
        "template",
    ),
    (
        "template that multiplies a string past the output limit",
        "/v1/chat_templates",
        {"json": {"name": "huge", "template": "{{ 'x' * 10000000000 }}"}},
        "template",
    ),
    (
        "template that asks lipsum for a book",
        "/v1/chat_templates",
        {"json": {"name": "lorem", "template": "{{ lipsum(n=10000000) | length }}"}},
        "template",
    ),
    (
        "template that renders too much",
        "/v1/chat_templates",
        {"json": {"name": "loop", "template": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"}},
        "template",
    ),
]


@pytest.mark.parametrize(("path", "kwargs", "param"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_400_naming_the_field(server: Server, path: str, kwargs: dict, param: str | None) -> None:
    if "content" in kwargs:
        kwargs = {**kwargs, "headers": {"Content-Type": "application/json"}}
    answer = call(server, "POST", path, **kwargs)
    if param is None:  # refused before it reaches the route: the body is over the request limit
        assert answer.status_code == 413
    else:
        assert error(answer, 400)["param"] == param
    assert "uid=" not in answer.text and "dtype" not in answer.text
    assert call(server, "GET", "/readyz", None).status_code == 200
    assert call(server, "POST", "/v1/chat/completions", json=CHAT).status_code == 200


def test_a_template_that_passes_the_check_is_time_limited_when_serving(server: Server) -> None:
    """The check renders four messages; this template spins only on more. Serving stops it at the same limit."""
    shipped = {t["name"]: t["template"] for t in call(server, "GET", "/v1/chat_templates").json()["data"]}["chatml"]
    trap = "{% if messages | length > 4 %}" + SPIN + "{% endif %}" + shipped
    assert (
        call(
            server, "POST", "/v1/chat_templates", json={"name": "chatml", "template": trap, "override": True}
        ).status_code
        == 200
    )
    try:
        chat = {**CHAT, "messages": CHAT["messages"] * 5}
        assert error(call(server, "POST", "/v1/chat/completions", json=chat), 400)["code"] == "invalid_template"
        assert call(server, "POST", "/v1/chat/completions", json=CHAT).status_code == 200
    finally:
        body = {"name": "chatml", "template": shipped, "override": True}
        assert call(server, "POST", "/v1/chat_templates", json=body).status_code == 200


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 1000):
        yield b" " * 1000


def test_chunked_bodies_are_counted_as_they_stream(server: Server) -> None:
    answer = call(
        server, "POST", "/v1/chat/completions", content=_chunks(50_000), headers={"Content-Type": "application/json"}
    )
    assert error(answer, 413)["code"] == "request_too_large"
    # Uploads have their own, larger limit, chunked or not.
    big = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + b"x" * 150_000
    answer = call(
        server,
        "POST",
        "/v1/files",
        content=iter([big[i : i + 4096] for i in range(0, len(big), 4096)]),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert error(answer, 413)["code"] == "request_too_large"
    small = call(
        server, "POST", "/v1/files", files={"file": ("chats.jsonl", jsonl(CHATS) * 1)}, data={"purpose": "fine-tune"}
    )
    assert small.status_code == 200 and len(jsonl(CHATS)) > 0


@pytest.mark.parametrize("query", [{"limit": -1}, {"limit": 0}, {"limit": "abc"}, {"limit": 101}])
def test_list_limits_are_strict(server: Server, query: dict) -> None:
    assert error(call(server, "GET", "/v1/fine_tuning/jobs", params=query), 400)["param"] == "limit"


def _upload(server: Server, name: str = "chats.jsonl") -> dict:
    answer = call(server, "POST", "/v1/files", files={"file": (name, jsonl(CHATS))}, data={"purpose": "fine-tune"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_upload_names_are_sanitised(server: Server) -> None:
    for given, kept in (
        ("../../etc/evil.jsonl", "evil.jsonl"),
        ("..\\..\\win.jsonl", "win.jsonl"),
        (".hidden.jsonl", "hidden.jsonl"),
        ("..", "upload"),
    ):
        assert _upload(server, given)["filename"] == kept


HYPERPARAMETERS = [
    ({"hyperparameters": {"n_epochs": -3}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 10**9}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"beta": -1}}, "hyperparameters.beta"),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
        "method.supervised.hyperparameters.n_epochs",
    ),
    ({"epochs": 0}, "epochs"),
    ({"learning_rate": 1e9}, "learning_rate"),
    ({"per_device_train_batch_size": 100_000}, "per_device_train_batch_size"),
    ({"Training": {"epochs": -1}}, "Training.epochs"),
    # Unknown keys in a hyperparameters or method block are refused too, never dropped.
    ({"hyperparameters": {"foo": 1}}, "hyperparameters.foo"),
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"foo": 1}}}},
        "method.supervised.hyperparameters.foo",
    ),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"foo": 1}}}}, "method.dpo.hyperparameters.foo"),
    (
        {"method": {"type": "reinforcement", "reinforcement": {"grader": {}, "hyperparameters": {"foo": 1}}}},
        "method.reinforcement.hyperparameters.foo",
    ),
    ({"method": {"type": "supervised", "supervised": {}, "rerank": {}}}, "method.rerank"),
    ({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}}, "method.dpo"),
    ({"Training": {"epoch": 2}}, "Training.epoch"),  # OPEA's blocks: a key OPEA has not
    ({"Dataset": {"mask_input": False}}, "Dataset.mask_input"),  # OPEA's, but not applied here
    # Values the runner would fail on, or an adapter this server could not serve.
    ({"seed": 2**70}, "seed"),
    ({"seed": -1}, "seed"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"test_file_eval_steps": 0}, "test_file_eval_steps"),
    ({"r": 100_000}, "r"),
    ({"General": {"lora_config": {"r": 100_000}}}, "General.lora_config.r"),
    ({"max_steps": 0}, "max_steps"),
]


@pytest.mark.parametrize(("fields", "param"), HYPERPARAMETERS, ids=[p for _, p in HYPERPARAMETERS])
def test_hyperparameter_ranges_and_keys(server: Server, fields: dict, param: str) -> None:
    body = {"model": "tiny", "training_file": _upload(server)["id"], **fields}
    assert error(call(server, "POST", "/v1/fine_tuning/jobs", json=body), 400)["param"] == param


def test_both_cancel_routes_agree(server: Server) -> None:
    body = {"model": "tiny", "training_file": _upload(server)["id"], "max_steps": 1}
    job = call(server, "POST", "/v1/fine_tuning/jobs", json=body).json()
    first = call(server, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = [
        call(server, "POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        call(server, "POST", "/v1/fine_tuning/jobs/cancel", json={"fine_tuning_job_id": job["id"]}),
    ]
    assert [a.status_code for a in again] == [400, 400] and again[0].json() == again[1].json()


def test_405_says_what_is_allowed(server: Server) -> None:
    answer = call(server, "PUT", "/v1/models")
    assert error(answer, 405) and answer.headers["allow"] == "GET"
    assert set(call(server, "DELETE", "/v1/chat/completions").headers["allow"].split(", ")) == {"POST"}


def test_every_path_answers_an_undeclared_method_with_405_and_allow(server: Server) -> None:
    """Each path of the OpenAPI document, with a method it does not declare: a 405 whose Allow lists the methods of
    every documented path that URL matches (/fine_tuning/jobs/retrieve is also GET /fine_tuning/jobs/{job_id})."""
    paths = call(server, "GET", "/v1/openapi.json").json()["paths"]
    patterns = {path: re.compile(re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path in paths}
    wrong = []
    for path in paths:
        url = re.sub(r"\{[^}]+\}", "x", path)
        declared = {m.upper() for other, ops in paths.items() if patterns[other].match(url) for m in ops}
        answer = call(server, "PATCH", f"/v1{url}")
        if answer.status_code != 405 or set(answer.headers.get("allow", "").split(", ")) != declared:
            wrong.append(f"PATCH {url}: {answer.status_code} Allow={answer.headers.get('allow')} (declared {declared})")
    assert len(paths) >= 25 and not wrong, wrong


def test_openapi_declares_the_errors(server: Server) -> None:
    schema = call(server, "GET", "/v1/openapi.json").json()
    chat = schema["paths"]["/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429"} <= set(chat) and "422" not in chat
    files = schema["paths"]["/files"]["post"]["responses"]
    assert {"400", "401", "403", "413"} <= set(files)
    assert "409" in schema["paths"]["/chat_templates"]["post"]["responses"]
    assert "(100000 bytes, BENTOSERVICE_MAX_FILE_BYTES)" in files["413"]["description"]
    assert "(20000 bytes, BENTOSERVICE_MAX_REQUEST_BYTES)" in chat["413"]["description"]
    assert schema["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error"]
    seed = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] >= 2**63 and seed["minimum"] <= -(2**63)


def _bounds(prop: dict) -> tuple[float, float]:
    for kind in prop.get("anyOf", [prop]):
        if kind.get("type") == "integer":
            return kind["minimum"], kind["maximum"]
    raise AssertionError(prop)


# (path, field, the body it goes in); the server's settings say 40 tokens, 3 choices.
BOUNDS = [
    ("/chat/completions", "max_tokens", "ChatCompletionRequest", 1, 40),
    ("/chat/completions", "max_completion_tokens", "ChatCompletionRequest", 1, 40),
    ("/chat/completions", "n", "ChatCompletionRequest", 1, 3),
    ("/chat/completions", "top_logprobs", "ChatCompletionRequest", 0, 20),
    ("/completions", "max_tokens", "CompletionRequest", 1, 40),
    ("/completions", "n", "CompletionRequest", 1, 3),
    ("/completions", "logprobs", "CompletionRequest", 0, 5),
]


@pytest.mark.parametrize(("path", "field", "model", "low", "high"), BOUNDS, ids=[f"{p} {f}" for p, f, *_ in BOUNDS])
def test_numeric_limits_are_schema_bounds_the_server_enforces(
    server: Server, path: str, field: str, model: str, low: int, high: int
) -> None:
    schema = call(server, "GET", "/v1/openapi.json").json()
    assert _bounds(schema["components"]["schemas"][model]["properties"][field]) == (low, high)
    body = {
        "model": "tiny",
        "max_tokens": 2,
        **({"messages": CHAT["messages"]} if model.startswith("Chat") else {"prompt": "hi"}),
    }
    if field == "top_logprobs":
        body["logprobs"] = True
    for value in (low, high):
        answer = call(server, "POST", f"/v1{path}", json={**body, field: value})
        assert answer.status_code == 200, answer.text
    for value in (low - 1, high + 1):
        assert error(call(server, "POST", f"/v1{path}", json={**body, field: value}), 400)["param"] == field


def test_the_body_limit_is_stated_and_enforced(server: Server) -> None:
    schema = call(server, "GET", "/v1/openapi.json").json()
    stated = {
        p: ops["post"]["requestBody"]["x-max-bytes"]
        for p, ops in schema["paths"].items()
        if "post" in ops and "requestBody" in ops["post"]
    }
    assert stated["/chat/completions"] == 20000 and stated["/files"] == 100000
    padded = {**CHAT, "user": "x" * (20000 - len(json.dumps({**CHAT, "user": ""})))}
    assert len(json.dumps(padded)) == 20000
    assert (
        call(
            server,
            "POST",
            "/v1/chat/completions",
            content=json.dumps(padded),
            headers={"Content-Type": "application/json"},
        ).status_code
        == 200
    )
    over = {**padded, "user": padded["user"] + "x"}
    answer = call(
        server, "POST", "/v1/chat/completions", content=json.dumps(over), headers={"Content-Type": "application/json"}
    )
    assert error(answer, 413)["code"] == "request_too_large"


def test_a_job_of_zero_steps_fails_and_publishes_nothing(tiny, tmp_path: Path) -> None:
    import bentoservice
    from bentoservice import store
    from bentoservice.training.config import TrainingError

    before = {str(m.tag) for m in store.list_models("adapter")}
    with pytest.raises(TrainingError, match="0 optimizer steps"):
        bentoservice.AutoLLM.for_model("tiny").tuning(
            CHATS, args={"num_train_epochs": 0, "output_dir": str(tmp_path / "out"), "report_to": []}
        )
    assert {str(m.tag) for m in store.list_models("adapter")} == before
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_the_log_holds_no_key(server: Server) -> None:
    """Run last in this module: every request above sent one of these keys."""
    call(server, "GET", "/v1/models", "sk-wrong-key-xyz")
    log = server.output()
    assert "GET /v1/models" in log or "/v1/models" in log, log[-2000:]  # the requests are logged, not their keys
    assert not [k for k in (ADMIN, INFERENCE, LEGACY, "sk-admin-2", "sk-infer-2", "sk-wrong-key-xyz") if k in log]
