"""Serving the default model OpenAI-compatibly, through the real server and the official SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import Server

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_answers_paris(smollm2_server: Server) -> None:
    reply = smollm2_server.client().chat.completions.create(model="smollm2", messages=PARIS, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_hub_id_is_an_alias(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    reply = client.chat.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=PARIS, temperature=0, max_completion_tokens=12
    )
    assert "Paris" in reply.choices[0].message.content
    assert client.models.retrieve("HuggingFaceTB/SmolLM2-135M-Instruct").id == "smollm2"


def test_streaming_equals_non_streaming(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(smollm2_server: Server) -> None:
    body = {"model": "smollm2", "messages": PARIS, "stream": True, "max_tokens": 5}
    with httpx.stream("POST", f"{smollm2_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"


def test_completions(smollm2_server: Server) -> None:
    client = smollm2_server.client()
    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == done.choices[0].text


def test_list_models(smollm2_server: Server) -> None:
    models = smollm2_server.client().models.list().data
    # The LLM, then the store's adapters of it (other tests may have trained some), then the embedding model.
    bases = [m.id for m in models if getattr(m, "parent", None) is None]
    assert bases == ["smollm2", "minilm"] and models[0].id == "smollm2" and models[-1].id == "minilm"
    assert all(getattr(m, "parent", None) == "smollm2" for m in models[1:-1])
    with pytest.raises(openai.NotFoundError):
        smollm2_server.client().models.retrieve("gpt-4")


def test_unknown_model_is_404(smollm2_server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        smollm2_server.client().chat.completions.create(model="gpt-4", messages=PARIS)
    assert err.value.body["code"] == "model_not_found" and "gpt-4" in err.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "smollm2"}, "messages"),
        ({"model": "smollm2", "messages": []}, "messages"),
        ({"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "smollm2", "messages": PARIS, "n": 9}, "n"),  # over BENTOSERVICE_MAX_CHOICES (8)
        ({"model": "smollm2", "messages": PARIS, "n": 0}, "n"),
        ({"model": "smollm2", "messages": PARIS, "temperature": 7}, "temperature"),
        ({"model": "smollm2", "messages": PARIS, "max_tokens": 0}, "max_tokens"),
        ({"model": "smollm2", "messages": PARIS, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_requests_are_400(smollm2_server: Server, body: dict, param: str) -> None:
    response = httpx.post(f"{smollm2_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_malformed_json_is_400(smollm2_server: Server) -> None:
    response = httpx.post(
        f"{smollm2_server.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and "error" in response.json()


def test_context_overflow_says_the_numbers(smollm2_server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        smollm2_server.client().chat.completions.create(model="smollm2", messages=PARIS, max_tokens=9000)
    message = err.value.body["message"]
    assert err.value.body["code"] == "context_length_exceeded"
    assert "8192" in message and "9000" in message


def test_unknown_route_and_method(smollm2_server: Server) -> None:
    missing = httpx.get(f"{smollm2_server.url}/v1/no/such/route", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{smollm2_server.url}/v1/chat/completions", timeout=30)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_oversized_body_is_413(smollm2_server: Server) -> None:
    huge = {"model": "smollm2", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    response = httpx.post(f"{smollm2_server.url}/v1/chat/completions", json=huge, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_server_healthy_after_bad_requests(smollm2_server: Server) -> None:
    httpx.post(f"{smollm2_server.url}/v1/chat/completions", content=b"\xff\xfe", timeout=30)
    assert httpx.get(f"{smollm2_server.url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{smollm2_server.url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{smollm2_server.url}/metrics", timeout=10).status_code == 200
    reply = smollm2_server.client().chat.completions.create(
        model="smollm2", messages=PARIS, temperature=0, max_tokens=10
    )
    assert "Paris" in reply.choices[0].message.content


def test_stop_and_length(tiny_server: Server) -> None:
    client = tiny_server.client()
    free = client.completions.create(model="tiny", prompt="one two three", max_tokens=20, temperature=0)
    assert free.choices[0].finish_reason == "length" and free.usage.completion_tokens == 20
    text = free.choices[0].text
    stop = text[5:8]
    stopped = client.completions.create(model="tiny", prompt="one two three", max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(tiny_server: Server) -> None:
    client = tiny_server.client()
    runs = [
        client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=1.0, seed=seed)
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_chat_templates_registry(tiny_server: Server) -> None:
    listed = httpx.get(f"{tiny_server.url}/v1/chat_templates", timeout=10).json()
    assert {"chatml", "vicuna_v1.1", "llama-2", "alpaca"} <= {t["name"] for t in listed["data"]}
    assert listed["model_template"]["name"] == "tokenizer"
    body = {"name": "chatml", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}
    refused = httpx.post(f"{tiny_server.url}/v1/chat_templates", json=body, timeout=10)
    assert refused.status_code == 409 and "override" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "template_exists" and refused.json()["error"]["param"] == "name"
    assert (
        httpx.post(f"{tiny_server.url}/v1/chat_templates", json={**body, "override": True}, timeout=10).status_code
        == 200
    )


def test_api_key_and_named_template(tiny) -> None:
    server = Server("tiny", "--api-key", "sk-test", "--chat-template", "vicuna_v1.1")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        bases = [m.id for m in server.client("sk-test").models.list().data if m.parent is None]
        assert bases == ["tiny", "minilm"]  # plus any fine-tunes restored from the shared data dir
        conv = httpx.post(
            f"{server.url}/v1/worker_get_conversation_template",
            json={"model": "tiny"},
            headers={"authorization": "Bearer sk-test"},
            timeout=10,
        ).json()["conv"]
        assert conv["name"] == "vicuna_v1.1"
        assert conv["example"].startswith("A chat between a curious user") and conv["example"].endswith(
            "USER: Hello! ASSISTANT:"
        )
    finally:
        server.stop()


def test_api_layer_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, bentoservice.api; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
