"""Structured outputs through the real server and the official SDK (tiny random model: the grammar alone makes
its output valid): response_format json_object / json_schema, the SDK's parse helper, streaming under a schema,
vLLM's guided extras on completions, a mixed batch of constrained, free and adapter rows, and 400s."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Annotated, Literal

import httpx
import openai
import pytest
from conftest import Server
from pydantic import BaseModel, ConfigDict, Field
from test_adapters import make_adapter


class Pet(BaseModel):
    name: Annotated[str, Field(max_length=10)]
    age: Annotated[int, Field(ge=0, le=30)]
    kind: Literal["cat", "dog"]
    vaccinated: bool


class Place(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: Annotated[str, Field(max_length=8)]
    rank: Annotated[int, Field(ge=1, le=9)]
    tags: Annotated[list[Literal["a", "b"]], Field(max_length=3)]


SCHEMA = Place.model_json_schema()
HELLO = [{"role": "user", "content": "Describe a pet."}]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter = make_adapter(tmp_path_factory.mktemp("structured") / "a1", tiny_dir, seed=1)
    server = Server("tiny", "--adapter-id", str(adapter), "--adapter-name", "a1", env={"BENTOSERVICE_MAX_RUNNING": "8"})
    yield server
    server.stop()


def _post(server: Server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=120)


def test_json_schema_validates(server: Server) -> None:
    reply = server.client().chat.completions.create(
        model="tiny", messages=HELLO, response_format=JSON_SCHEMA, max_tokens=120, temperature=1, seed=3
    )
    assert reply.choices[0].finish_reason == "stop"
    Place.model_validate_json(reply.choices[0].message.content or "")


def test_json_object_parses_to_an_object(smollm2_server: Server) -> None:
    reply = smollm2_server.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give the capital of France as JSON with the key capital."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_the_sdk_parse_helper_returns_the_model(server: Server) -> None:
    for seed in (1, 2):
        reply = server.client().beta.chat.completions.parse(
            model="tiny", messages=HELLO, response_format=Pet, max_tokens=120, temperature=1, seed=seed
        )
        parsed = reply.choices[0].message.parsed
        assert isinstance(parsed, Pet) and parsed.kind in ("cat", "dog")


def test_streaming_under_a_schema(server: Server) -> None:
    chunks = server.client().chat.completions.create(
        model="a1", messages=HELLO, response_format=JSON_SCHEMA, max_tokens=120, stream=True, temperature=0
    )
    parts, finish = [], None
    for chunk in chunks:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 1
    Place.model_validate_json("".join(parts))


def test_guided_extras_on_completions(server: Server) -> None:
    client = server.client()

    def text(**extra) -> str:
        done = client.completions.create(model="tiny", prompt="x", max_tokens=60, temperature=1, seed=5, **extra)
        assert done.choices[0].finish_reason == "stop"
        return done.choices[0].text

    assert text(extra_body={"guided_choice": ["red", "green", "blue"]}) in ("red", "green", "blue")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text(extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"}))
    assert re.fullmatch(
        r"(yes|no)!", text(extra_body={"structured_outputs": {"grammar": 'root ::= ("yes" | "no") "!"'}})
    )
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [
                {"type": "const_string", "value": "<answer>"},
                {"type": "regex", "pattern": "[0-9]{2}"},
                {"type": "const_string", "value": "</answer>"},
            ],
        },
    }
    assert re.fullmatch(
        r"<answer>[0-9]{2}</answer>", text(extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}})
    )
    Place.model_validate_json(text(extra_body={"guided_json": SCHEMA}))
    Place.model_validate_json(text(extra_body={"response_format": JSON_SCHEMA}))


def test_text_format_is_free_text_and_length_still_cuts(server: Server) -> None:
    client = server.client()
    free = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    same = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, response_format={"type": "text"}
    )
    assert same.choices[0].message.content == free.choices[0].message.content
    cut = client.chat.completions.create(model="tiny", messages=HELLO, response_format=JSON_SCHEMA, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith('{"')


def test_a_mixed_batch(server: Server) -> None:
    """Constrained and free rows, on the base and an adapter, at once: each constrained row validates, and each
    free greedy row says what it says alone."""
    client = server.client()

    def free(model: str) -> dict:
        return {"model": model, "messages": HELLO, "max_tokens": 24, "temperature": 0}

    alone = {
        model: client.chat.completions.create(**free(model)).choices[0].message.content for model in ("tiny", "a1")
    }

    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none")
        calls = [aclient.chat.completions.create(**free(m)) for m in ("tiny", "a1", "tiny", "a1")]
        calls += [
            aclient.chat.completions.create(
                model=m, messages=HELLO, response_format=JSON_SCHEMA, max_tokens=120, temperature=1, seed=i
            )
            for i, m in enumerate(("tiny", "a1", "tiny", "a1"))
        ]
        return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    for reply, model in zip(replies[:4], ("tiny", "a1", "tiny", "a1"), strict=True):
        assert reply.choices[0].message.content == alone[model]
    for reply in replies[4:]:
        assert reply.choices[0].finish_reason == "stop"
        Place.model_validate_json(reply.choices[0].message.content)


@pytest.mark.parametrize(
    "route,extra,param",
    [
        (
            "chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
        ),
        ("chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
        (
            "chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        ("chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ("chat/completions", {"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
        ("completions", {"guided_regex": "(unclosed"}, "guided_regex"),
        ("completions", {"guided_json": "{not json"}, "guided_json"),
        ("completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ("completions", {"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ],
)
def test_bad_grammars_are_400_naming_the_field(server: Server, route: str, extra: dict, param: str) -> None:
    base = {"model": "tiny", "max_tokens": 4, **({"messages": HELLO} if route.startswith("chat") else {"prompt": "x"})}
    response = _post(server, route, {**base, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and error["type"] == "invalid_request_error", error
