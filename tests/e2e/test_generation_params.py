"""OpenAI's generation fields through the real server and the official SDK: n, log-probabilities, echo,
penalties, logit bias, vLLM's extras, metadata accepted, and a 400 naming every field not supported."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import Server
from transformers import AutoTokenizer

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _post(server: Server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)


CHAT = {"model": "tiny", "messages": HELLO, "max_tokens": 4}
TEXT = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


@pytest.mark.parametrize(
    "route,extra,param",
    [
        ("chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("chat/completions", {"function_call": "auto"}, "function_call"),
        ("chat/completions", {"verbosity": "low"}, "verbosity"),
        ("chat/completions", {"moderation": {"model": "m"}}, "moderation"),
        ("chat/completions", {"prompt_cache_options": {}}, "prompt_cache_options"),
        ("chat/completions", {"frobnicate": 1}, "frobnicate"),
        ("chat/completions", {"top_k": 5}, "top_k"),  # a vLLM extra this server does not implement
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("chat/completions", {"stop_token_ids": [999999]}, "stop_token_ids"),
        ("chat/completions", {"n": 5}, "n"),  # over the bound (BENTOSERVICE_MAX_RUNNING=4 here)
        ("chat/completions", {"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        (
            "chat/completions",
            {"messages": [{"role": "tool", "content": "4", "tool_call_id": "c"}]},  # answers no call
            "messages.0.tool_call_id",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]},
            "messages.0.tool_calls.0.function",
        ),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"echo": True, "logprobs": 1}, "logprobs"),
        ("completions", {"tools": []}, "tools"),  # chat's fields are not completions'
        ("completions", {"metadata": {"team": "a"}}, "metadata"),
    ],
)
def test_fields_not_supported_are_400_naming_them(tiny_server: Server, route: str, extra: dict, param: str) -> None:
    base = CHAT if route.startswith("chat") else TEXT
    reply = _post(tiny_server, route, {**base, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_metadata_and_harmless_values_are_accepted(tiny_server: Server) -> None:
    client = tiny_server.client()
    reply = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=3,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        safety_identifier="s",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        modalities=["text"],
        response_format={"type": "text"},
        parallel_tool_calls=False,
        stream_options=None,
    )
    assert reply.choices[0].message.content is not None
    chunks = client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"functions": [], "audio": None},
    )
    [usage] = [c.usage for c in chunks if c.usage]
    assert 1 <= usage.completion_tokens <= 3
    again = client.chat.completions.create(
        model="tiny",
        max_tokens=3,
        messages=[*HELLO, reply.choices[0].message.model_dump(), {"role": "user", "content": "again"}],
    )
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens
    text = client.completions.create(model="tiny", prompt="hello", max_tokens=3, best_of=1, user="u-1")
    assert text.usage.completion_tokens == 3


def test_n_choices_share_a_prompt(tiny_server: Server) -> None:
    client = tiny_server.client()
    one = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1, n=3, seed=5)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) == 3
    again = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1, n=3, seed=5)
    assert [c.message.content for c in again.choices] == texts
    streamed = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=12,
        temperature=1,
        n=3,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
        if chunk.usage:
            assert chunk.usage.completion_tokens == sampled.usage.completion_tokens
    assert streamed == texts and finished == {0, 1, 2}


def test_chat_logprobs(tiny_server: Server) -> None:
    client = tiny_server.client()
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the top token
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_and_echo(tiny_server: Server) -> None:
    client = tiny_server.client()
    reply = client.completions.create(model="tiny", prompt="one two", max_tokens=5, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(
        1 <= len(top) <= 2 and max(top.values()) == pytest.approx(lp)
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=False)
    )
    echoed = client.completions.create(model="tiny", prompt="one two", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "one two" + reply.choices[0].text
    chunks = client.completions.create(
        model="tiny", prompt="one two", max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def _greedy(server: Server, **extra) -> tuple[str, str, int]:
    reply = server.client().completions.create(
        model="tiny", prompt="one two three", max_tokens=24, temperature=0, **extra
    )
    return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens


@pytest.mark.parametrize(
    "penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}]
)
def test_penalties_change_the_output(tiny_server: Server, penalty: dict) -> None:
    assert _greedy(tiny_server, **penalty)[0] != _greedy(tiny_server)[0]


def test_logit_bias_and_end_tokens(tiny_server: Server, tokenizer) -> None:
    word = tokenizer.encode(" apple", add_special_tokens=False)[0]
    text, _, _ = _greedy(tiny_server, logit_bias={str(word): 100})
    assert text == tokenizer.decode([word]) * 24
    first = tokenizer.encode(_greedy(tiny_server)[0], add_special_tokens=False)[0]
    assert (
        tokenizer.encode(_greedy(tiny_server, logit_bias={str(first): -100})[0], add_special_tokens=False)[0] != first
    )
    eos = tokenizer.eos_token_id
    assert _greedy(tiny_server, logit_bias={str(eos): 100}) == ("", "stop", 1)
    assert _greedy(tiny_server, logit_bias={str(eos): 100}, extra_body={"min_tokens": 3})[1:] == ("stop", 4)
    assert _greedy(tiny_server, logit_bias={str(eos): 100}, extra_body={"ignore_eos": True})[1:] == ("length", 24)
    assert _greedy(tiny_server, logit_bias={str(word): 100}, extra_body={"stop_token_ids": [word]}) == ("", "stop", 1)
