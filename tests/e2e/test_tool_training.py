"""Fine-tuning on OpenAI's function-calling lines: the chat rendered in the tool format the server parses (the
prompt the server gives SmolLM2 with the same tools), labels on the calls and the answer only, and a real SFT run
on such a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bentoml
import pytest

import bentoservice
from bentoservice import store
from bentoservice.engine.tool_parsers import tool_format
from bentoservice.training.data.formats import load_file
from bentoservice.training.data.labels import IGNORE
from bentoservice.training.methods.trainers import assistant_labels, load_tokenizer, render, tool_chat

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
ARGUMENTS = '{"city": "Paris"}'
LINE = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
}


@pytest.fixture
def tool_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(LINE) + "\n" + json.dumps(LINE) + "\n")
    return path


def test_tool_lines_train_on_the_calls_and_the_answer(smollm2: store.StoredModel, tool_file: Path) -> None:
    tokenizer = load_tokenizer(smollm2.path)
    row = load_file(tool_file).rows[0]
    labelled = assistant_labels(tokenizer, row["messages"], row["tools"])
    pairs = list(zip(labelled["input_ids"], labelled["labels"], strict=True))
    trained = tokenizer.decode([t for t, label in pairs if label != IGNORE])
    ignored = tokenizer.decode([t for t, label in pairs if label == IGNORE])
    call = tool_format("hermes").render_call({"name": "get_weather", "arguments": ARGUMENTS})
    assert trained == f"{call}<|im_end|>\nIt is 21 degrees.<|im_end|>\n"  # each turn to its end, as in test_training
    assert "<tools>" in ignored and json.dumps(WEATHER) in ignored  # the tools, in the system prompt
    assert "<tool_response>" in ignored and "Weather in Paris?" in ignored

    # The prompt the adapter learns to answer is the prompt the server renders for these tools (served.py).
    messages, tools = tool_chat(tokenizer, row["messages"][:1], row["tools"])
    prompt = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    assert labelled["input_ids"][: len(prompt)] == prompt


def test_a_tool_file_trains_an_adapter(tiny: store.StoredModel, tool_file: Path) -> None:
    args: dict[str, Any] = {"max_steps": 1, "per_device_train_batch_size": 2, "gradient_checkpointing": False}
    result = bentoservice.AutoLLM.for_model("tiny").tuning(tool_file, method="sft", args=args)
    try:
        assert result.adapter_path is not None and (result.adapter_path / "adapter_model.safetensors").is_file()
        assert result.metrics["train_loss"] > 0
    finally:
        bentoml.models.delete(result.tag)  # the test store persists between runs
