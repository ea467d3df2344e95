"""Training data formats: each format's canonical rows, each bad file's error and where it is."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from bentoservice.training.data.formats import DataFormatError, Dataset, check_lengths, load_file, parse_bytes

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
CHAT = {"messages": [USER, ASSISTANT]}


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def write(tmp_path: Path, content: str | bytes, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def load_error(tmp_path: Path, content: str | bytes, name: str = "train.jsonl", **kwargs: Any) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        load_file(write(tmp_path, content, name), **kwargs)
    return info.value


# --- formats -----------------------------------------------------------------------------------


def test_openai_chat(tmp_path: Path) -> None:
    parts = {
        "role": "user",
        "name": "ann",
        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
    }
    weighted = {"role": "assistant", "content": "Hi!", "weight": 0}
    ds = load_file(write(tmp_path, jsonl({"messages": [SYSTEM, USER, ASSISTANT, parts, weighted]}, CHAT)))
    assert (ds.format, ds.kind, ds.lines, ds.unit) == ("openai_chat", "sft", [1, 2], "line")
    assert ds.rows == [
        {
            "messages": [
                SYSTEM,
                USER,
                ASSISTANT,
                {"role": "user", "content": "Hello\nthere"},
                {"role": "assistant", "content": "Hi!"},
            ]
        },
        {"messages": [USER, ASSISTANT]},
    ]


def test_sharegpt_json_array(tmp_path: Path) -> None:
    data = [
        {
            "id": "a1",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "What is 2+2?"},
                {"from": "gpt", "value": "4"},
                {"from": "user", "value": "And 3+3?"},
                {"from": "assistant", "value": "6"},
            ],
        }
    ]
    ds = load_file(write(tmp_path, json.dumps(data, indent=2), "sharegpt.json"))
    assert (ds.format, ds.kind, ds.lines, ds.unit) == ("sharegpt", "sft", [1], "record")
    assert ds.rows == [
        {
            "messages": [
                SYSTEM,
                USER,
                ASSISTANT,
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        }
    ]


def test_sharegpt_jsonl(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}
    ds = load_file(write(tmp_path, jsonl(record)))
    assert (ds.format, ds.rows) == ("sharegpt", [CHAT])


def test_alpaca_json_array(tmp_path: Path) -> None:
    data = [
        {"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, move."},
        {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
        {"instruction": "Say hi.", "input": None, "output": "Hi."},
        {"instruction": "Say bye.", "output": "Bye."},
    ]
    ds = load_file(write(tmp_path, json.dumps(data, indent=4), "alpaca_data.json"))
    assert (ds.format, ds.kind, ds.lines, ds.unit) == ("alpaca", "sft", [1, 2, 3, 4], "record")
    assert [row["messages"] for row in ds.rows] == [
        [{"role": "user", "content": "Give three tips."}, {"role": "assistant", "content": "Eat, sleep, move."}],
        [{"role": "user", "content": "Translate to French.\n\ncheese"}, {"role": "assistant", "content": "fromage"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
        [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}],
    ]


def test_alpaca_jsonl(tmp_path: Path) -> None:
    ds = load_file(write(tmp_path, jsonl({"instruction": "What is 2+2?", "input": "", "output": "4"})))
    assert (ds.format, ds.rows) == ("alpaca", [CHAT])


def test_prompt_completion(tmp_path: Path) -> None:
    ds = load_file(
        write(
            tmp_path,
            jsonl({"prompt": "What is 2+2?", "completion": "4"}, {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}),
        )
    )
    assert (ds.format, ds.kind) == ("prompt_completion", "sft")
    assert ds.rows == [CHAT, {"messages": [SYSTEM, USER, ASSISTANT]}]


def test_preference(tmp_path: Path) -> None:
    wrong = {"role": "assistant", "content": "5"}
    ds = load_file(
        write(
            tmp_path,
            jsonl(
                {"prompt": [SYSTEM, USER], "chosen": [ASSISTANT], "rejected": [wrong]},
                {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
            ),
        ),
        expect="preference",
    )
    assert (ds.format, ds.kind) == ("preference", "preference")
    assert ds.rows == [
        {"prompt": [SYSTEM, USER], "chosen": [ASSISTANT], "rejected": [wrong]},
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [wrong]},
    ]


def test_openai_preference(tmp_path: Path) -> None:
    record = {
        "input": {"messages": [USER], "tools": []},
        "preferred_output": [ASSISTANT],
        "non_preferred_output": [{"role": "assistant", "content": "5"}],
    }
    ds = load_file(write(tmp_path, jsonl(record)))
    assert (ds.format, ds.kind) == ("openai_preference", "preference")
    assert ds.rows == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "5"}]}]


def test_flag_embedding(tmp_path: Path) -> None:
    """FlagEmbedding's toy_finetune_data.jsonl lines; neg may be empty or absent, a prompt goes before the query."""
    ds = load_file(
        write(
            tmp_path,
            jsonl(
                {
                    "query": "Five women walk along a beach.",
                    "pos": ["Women walk on a beach."],
                    "neg": ["The women are sitting.", "A man swims."],
                    "pos_scores": [1.0],
                },
                {"query": "a cat", "pos": ["A cat sleeps.", "Cats purr."], "neg": []},
                {"query": "a dog", "pos": ["A dog barks."], "prompt": "Represent this query: "},
            ),
        ),
        expect="rerank",
    )
    assert (ds.format, ds.kind, ds.lines) == ("flag_embedding", "rerank", [1, 2, 3])
    assert ds.rows == [
        {
            "query": "Five women walk along a beach.",
            "pos": ["Women walk on a beach."],
            "neg": ["The women are sitting.", "A man swims."],
        },
        {"query": "a cat", "pos": ["A cat sleeps.", "Cats purr."], "neg": []},
        {"query": "Represent this query: a dog", "pos": ["A dog barks."], "neg": []},
    ]


def test_expect_sft_given_rerank(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl(RERANK), expect="sft")
    assert str(err).startswith("this is rerank data but the job needs SFT data")
    err = load_error(tmp_path, jsonl(CHAT), expect="rerank")
    assert str(err).startswith("this is SFT data but the job needs rerank data (query, pos, neg)")


def test_bom_crlf_blank_lines_and_pretty_single_record(tmp_path: Path) -> None:
    text = "\n" + json.dumps(CHAT) + "\r\n\r\n   \n" + json.dumps(CHAT) + "\r\n"
    ds = load_file(write(tmp_path, b"\xef\xbb\xbf" + text.encode()))
    assert (ds.rows, ds.lines) == ([CHAT, CHAT], [2, 5])
    ds = load_file(write(tmp_path, "\n\n" + json.dumps(CHAT, indent=2), "one.json"))
    assert (ds.rows, ds.lines) == ([CHAT], [3])


def test_line_separator_inside_strings(tmp_path: Path) -> None:
    record = {"messages": [USER, {"role": "assistant", "content": "a\u2028b"}]}
    ds = load_file(write(tmp_path, json.dumps(record, ensure_ascii=False) + "\n"))
    assert ds.rows[0]["messages"][1]["content"] == "a\u2028b"


# --- errors ------------------------------------------------------------------------------------


def chat(*messages: Any) -> dict[str, Any]:
    return {"messages": list(messages)}


SHAREGPT = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}
ALPACA = {"instruction": "What is 2+2?", "input": "", "output": "4"}
PROMPT_COMPLETION = {"prompt": "What is 2+2?", "completion": "4"}
PAIR = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
OPENAI_PAIR = {
    "input": {"messages": [USER]},
    "preferred_output": [ASSISTANT],
    "non_preferred_output": [{"role": "assistant", "content": "5"}],
}
RERANK = {"query": "What is 2+2?", "pos": ["2+2 is 4."], "neg": ["2+2 is 5."]}

# (a good record of the format, a bad record, the problem, the field)
BAD_RECORDS = [
    pytest.param(CHAT, [CHAT], "expected a JSON object, got an array", None, id="array"),
    pytest.param(CHAT, "just text", "expected a JSON object, got a string", None, id="string"),
    pytest.param(
        CHAT, {"text": "hi"}, "no known fields (keys: 'text'); expected one of OpenAI chat", None, id="unknown"
    ),
    pytest.param(PROMPT_COMPLETION, {"prompt": "hi"}, "completion is missing", "completion", id="prompt-only"),
    pytest.param(CHAT, {"messages": "hi"}, "messages must be a list, got a string", "messages", id="messages-type"),
    pytest.param(CHAT, {"messages": []}, "messages is empty", "messages", id="messages-empty"),
    pytest.param(
        CHAT, chat(USER, "hi"), "messages[1] must be an object, got a string", "messages[1]", id="message-type"
    ),
    pytest.param(
        CHAT,
        chat(USER, {"role": "assistant"}),
        "messages[1].content is missing",
        "messages[1].content",
        id="content-missing",
    ),
    pytest.param(
        CHAT, chat(USER, {"content": "4"}), "messages[1].role is missing", "messages[1].role", id="role-missing"
    ),
    pytest.param(
        CHAT,
        chat(USER, {"role": "assistant", "content": 4}),
        "messages[1].content must be a string, got a number",
        "messages[1].content",
        id="content-type",
    ),
    pytest.param(
        CHAT,
        chat(USER, {"role": "assistant", "content": None}),
        "messages[1].content must be a string, got null",
        "messages[1].content",
        id="content-null",
    ),
    pytest.param(
        CHAT,
        chat(USER, {"role": "assistant", "content": "  "}),
        "messages[1].content is empty",
        "messages[1].content",
        id="content-empty",
    ),
    pytest.param(
        CHAT,
        chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, ASSISTANT),
        "messages[0].content[0].type must be 'text' (only text is supported), got 'image_url'",
        "messages[0].content[0].type",
        id="image-part",
    ),
    pytest.param(
        CHAT,
        chat(USER, {"role": "function", "content": "4"}),
        "messages[1].role must be one of 'system', 'user', 'assistant', 'tool', got 'function'",
        "messages[1].role",
        id="unknown-role",
    ),
    pytest.param(
        CHAT,
        chat(USER, USER, ASSISTANT),
        "messages[1].role must be 'assistant' after 'user', got 'user'",
        "messages[1].role",
        id="two-users",
    ),
    pytest.param(
        CHAT,
        chat(ASSISTANT),
        "messages[0].role must be 'user' to start the conversation, got 'assistant'",
        "messages[0].role",
        id="starts-with-assistant",
    ),
    pytest.param(
        CHAT,
        chat(USER, SYSTEM, ASSISTANT),
        "messages[1].role is 'system', but only a conversation's first message may be a system one",
        "messages[1].role",
        id="late-system",
    ),
    pytest.param(
        CHAT,
        chat(SYSTEM, USER),
        "messages must end with an 'assistant' message, but the last one is 'user'",
        "messages",
        id="ends-with-user",
    ),
    pytest.param(
        CHAT,
        chat(SYSTEM),
        "messages must end with an 'assistant' message, but the last one is 'system'",
        "messages",
        id="system-only",
    ),
    pytest.param(
        SHAREGPT,
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "hi"}]},
        "conversations[1].from must be 'assistant' after 'user', got 'human' (user)",
        "conversations[1].from",
        id="sharegpt-order",
    ),
    pytest.param(
        SHAREGPT,
        {"conversations": [{"from": "bot", "value": "hi"}]},
        "conversations[0].from must be one of 'human', 'gpt', 'system', 'user', 'assistant', got 'bot'",
        "conversations[0].from",
        id="sharegpt-role",
    ),
    pytest.param(ALPACA, {"instruction": "Say hi.", "input": ""}, "output is missing", "output", id="alpaca-output"),
    pytest.param(
        ALPACA,
        {"instruction": "Say hi.", "input": 3, "output": "hi"},
        "input must be a string, got a number",
        "input",
        id="alpaca-input-type",
    ),
    pytest.param(ALPACA, {"instruction": "", "output": "hi"}, "instruction is empty", "instruction", id="alpaca-empty"),
    pytest.param(
        PROMPT_COMPLETION,
        {"prompt": "hi", "completion": 1},
        "completion must be a string or a list of messages, got a number",
        "completion",
        id="completion-type",
    ),
    pytest.param(
        PAIR,
        {"prompt": [USER, ASSISTANT], "chosen": "a", "rejected": "b"},
        "prompt must end with a 'user' message, but the last one is 'assistant'",
        "prompt",
        id="prompt-ends-with-assistant",
    ),
    pytest.param(
        PAIR,
        {"prompt": "hi", "chosen": [USER], "rejected": "b"},
        "chosen[0].role must be 'assistant' after 'user', got 'user'",
        "chosen[0].role",
        id="chosen-user",
    ),
    pytest.param(PAIR, {"prompt": "hi", "chosen": "a"}, "rejected is missing", "rejected", id="rejected-missing"),
    pytest.param(
        OPENAI_PAIR,
        {**OPENAI_PAIR, "input": [USER]},
        "input must be an object, got an array",
        "input",
        id="openai-preference-input",
    ),
    pytest.param(
        OPENAI_PAIR,
        {**OPENAI_PAIR, "input": {"tools": []}},
        "input.messages is missing",
        "input.messages",
        id="openai-preference-messages",
    ),
    pytest.param(
        OPENAI_PAIR,
        {**OPENAI_PAIR, "non_preferred_output": "no"},
        "non_preferred_output must be a list, got a string",
        "non_preferred_output",
        id="openai-preference-output",
    ),
    pytest.param(RERANK, {"query": "hi", "neg": ["x"]}, "pos is missing", "pos", id="rerank-pos-missing"),
    pytest.param(RERANK, {"query": "hi", "pos": []}, "pos is empty", "pos", id="rerank-pos-empty"),
    pytest.param(
        RERANK, {"query": "hi", "pos": "x"}, "pos must be a list of passages, got a string", "pos", id="rerank-pos-type"
    ),
    pytest.param(
        RERANK,
        {"query": "hi", "pos": ["x"], "neg": ["y", 3]},
        "neg[1] must be a string, got a number",
        "neg[1]",
        id="rerank-neg-item",
    ),
    pytest.param(RERANK, {"query": "", "pos": ["x"]}, "query is empty", "query", id="rerank-query-empty"),
    pytest.param(RERANK, {"pos": ["x"], "neg": []}, "query is missing", "query", id="rerank-query-missing"),
]


@pytest.mark.parametrize(("good", "bad", "problem", "field"), BAD_RECORDS)
def test_bad_record_jsonl(tmp_path: Path, good: Any, bad: Any, problem: str, field: str | None) -> None:
    """The bad record is on line 3, after a good record and a blank line."""
    err = load_error(tmp_path, jsonl(good) + "\n" + jsonl(bad, good))
    assert (err.line, err.field) == (3, field)
    assert str(err).startswith(f"line 3: {problem}")


@pytest.mark.parametrize(("good", "bad", "problem", "field"), BAD_RECORDS)
def test_bad_record_json_array(tmp_path: Path, good: Any, bad: Any, problem: str, field: str | None) -> None:
    """In a JSON array the error names the record, here the second."""
    err = load_error(tmp_path, json.dumps([good, bad, good], indent=2), "train.json")
    assert (err.line, err.field, err.unit) == (2, field, "record")
    assert str(err).startswith(f"record 2: {problem}")


def test_invalid_json_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl(CHAT) + '{"messages": [}\n')
    assert err.line == 2
    assert str(err) == "line 2: invalid JSON: Expecting value (column 15)"


def test_invalid_json_array_names_the_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[\n  {"messages": []},\n  {"messages": [}\n]\n', "train.json")
    assert err.line == 3
    assert str(err) == "line 3: invalid JSON: Expecting value (column 17)"


def test_jsonl_starting_with_an_array(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl([CHAT], CHAT))
    assert str(err) == "line 1: expected a JSON object, got an array"


def test_json_array_with_data_after_it(tmp_path: Path) -> None:
    array = json.dumps([CHAT], indent=2)
    err = load_error(tmp_path, f"{array}\n{array}", "train.json")
    assert err.line == array.count("\n") + 2
    assert str(err) == f"line {err.line}: invalid JSON: Extra data (column 1)"


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf", b"[]", b"  [ ]\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    err = load_error(tmp_path, content)
    assert err.line is None
    assert str(err) == "the file is empty: it has no records"


def test_not_utf8(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl(CHAT).encode() + '{"messages": "caf\u00e9"}\n'.encode("latin-1"))
    assert err.line == 2
    assert str(err) == "line 2: the file is not UTF-8 (byte 0xe9); save it as UTF-8"


def test_mixed_formats(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl(CHAT, CHAT, {"instruction": "Say hi.", "output": "hi"}))
    assert err.line == 3
    assert str(err) == (
        "line 3: this record is Alpaca (instruction, input, output) but the file is OpenAI chat "
        "(messages), as line 1 shows; use one format per file"
    )


def test_mixed_formats_in_json_array(tmp_path: Path) -> None:
    pair = {"prompt": "hi", "chosen": "a", "rejected": "b"}
    err = load_error(tmp_path, json.dumps([pair, {"prompt": "hi", "completion": "a"}]), "train.json")
    assert str(err).startswith("record 2: this record is prompt/completion but the file is preference")


def test_expect_preference_given_sft(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl(CHAT), expect="preference")
    assert err.line is None
    assert str(err).startswith("this is SFT data but the job needs preference pairs")
    assert "OpenAI chat" in str(err)


def test_expect_sft_given_preference(tmp_path: Path) -> None:
    err = load_error(tmp_path, jsonl({"prompt": "hi", "chosen": "a", "rejected": "b"}), expect="sft")
    assert str(err).startswith("this is preference data but the job needs SFT data")


def test_expect_matching_kind(tmp_path: Path) -> None:
    assert load_file(write(tmp_path, jsonl(CHAT)), expect="sft").kind == "sft"


def test_error_survives_pickling() -> None:
    with pytest.raises(DataFormatError) as info:
        parse_bytes(jsonl(CHAT, chat(USER)).encode())
    err = pickle.loads(pickle.dumps(info.value))
    assert (err.line, err.field, str(err)) == (info.value.line, info.value.field, str(info.value))


# --- lengths -----------------------------------------------------------------------------------


def word_count(row: dict[str, Any]) -> int:
    return sum(len(m["content"].split()) for messages in row.values() for m in messages)


def test_check_lengths_names_the_first_long_line(tmp_path: Path) -> None:
    long = chat(USER, {"role": "assistant", "content": "word " * 20})
    ds = load_file(write(tmp_path, jsonl(CHAT) + "\n" + jsonl(long, long)))
    check_lengths(ds, word_count, 24)
    with pytest.raises(DataFormatError) as info:
        check_lengths(ds, word_count, 10)
    assert info.value.line == 3
    assert str(info.value) == (
        "line 3: the example is 23 tokens long, more than max_seq_length 10; shorten it or raise max_seq_length"
    )


def test_check_lengths_names_the_record_of_a_json_array(tmp_path: Path) -> None:
    pair = {"prompt": "one two", "chosen": "three", "rejected": "four five six"}
    ds = load_file(write(tmp_path, json.dumps([pair, pair]), "pairs.json"))
    with pytest.raises(DataFormatError) as info:
        check_lengths(ds, word_count, 5)
    assert (info.value.line, info.value.unit) == (1, "record")
    assert str(info.value).startswith("record 1: the example is 6 tokens long, more than max_seq_length 5;")


def test_check_lengths_on_a_dataset_built_by_hand() -> None:
    ds = Dataset("openai_chat", "sft", [CHAT, chat(USER, {"role": "assistant", "content": "a b c d"})])
    with pytest.raises(DataFormatError, match=r"^line 2: the example is 7 tokens long"):
        check_lengths(ds, word_count, 5)
