"""Fine-tuning: real LoRA training runs on the tiny model (and one on SmolLM2), the Python API and the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import datasets
import pytest
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

import bentoservice
from bentoservice import store
from bentoservice.training import hardware
from bentoservice.training.commands import fine_tune_app, train
from bentoservice.training.config import TrainingConfig, TrainingError
from bentoservice.training.data import formats
from bentoservice.training.data.formats import DataFormatError
from bentoservice.training.data.labels import IGNORE
from bentoservice.training.jobs.callbacks import ProgressCallback
from bentoservice.training.methods.trainers import assistant_labels, build_trainer, hf_dataset, load_tokenizer

QUICK = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "gradient_checkpointing": False}


def chat(i: int, reply: str = "Hi") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Say hello number {i}"},
            {"role": "assistant", "content": f"{reply} {i}!"},
        ]
    }


def pair(i: int) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": f"Question {i}?"}],
        "chosen": [{"role": "assistant", "content": "A kind answer."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def adapters() -> Iterator[list[str]]:
    """Store tags a test creates, deleted afterwards: the test store persists between runs."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        bentoml.models.delete(tag)


def lora_b_nonzero(base: Path, adapter: Path) -> bool:
    """Load the adapter with peft onto the base: LoRA's B matrices start at zero, so non-zero means trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    weights = [p for name, p in model.named_parameters() if "lora_B" in name]
    return bool(weights) and all(w.abs().sum() > 0 for w in weights)


# --- data and labels -------------------------------------------------------------------------


def test_labels_cover_assistant_turns_only(tiny: store.StoredModel, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny.path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    row = assistant_labels(tokenizer, messages)
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE])
    ignored = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE])
    # Both assistant turns, each with its end-of-turn token; nothing of the system or user turns.
    assert trained.split() == ["Hello", "there<|im_end|>", "Ciao<|im_end|>"]
    assert "Be brief." in ignored and "Hi<|im_end|>" in ignored and "Bye" in ignored
    assert "Hello" not in ignored and "Ciao" not in ignored

    # TRL trains on these labels as they are.
    config = TrainingConfig(model="tiny")
    args = {**config.trainer_args(), **hardware.precision("cpu", {}), "output_dir": str(tmp_path)}
    model = hardware.load_model(tiny.path, "cpu", "lora")
    dataset = formats.Dataset("openai_chat", "sft", [{"messages": messages}])
    trainer = build_trainer(
        config, model, tokenizer, args, hf_dataset(tokenizer, dataset), None, ProgressCallback(), "cpu"
    )
    assert trainer.train_dataset[0]["labels"] == row["labels"]


def test_config_defaults_and_validation() -> None:
    config = TrainingConfig(model="tiny", epochs=2, warmup_ratio=0.1)
    assert config.args == {"num_train_epochs": 2, "warmup_steps": 0.1}
    assert config.target_modules == "all-linear" and (config.r, config.lora_alpha) == (16, 32)
    args = config.trainer_args()
    assert args["learning_rate"] == 2e-4 and args["max_length"] == 2048 and args["packing"] is False
    assert TrainingConfig(method="dpo", beta=0.2, loss_type="ipo").trainer_args()["beta"] == 0.2
    with pytest.raises(ValidationError, match="unknown training argument"):
        TrainingConfig(lerning_rate=1e-3)
    with pytest.raises(ValidationError, match="not a valid store name"):
        TrainingConfig(adapter_name="My Adapter")
    with pytest.raises(ValidationError, match="max_seq_length"):
        TrainingConfig(args={"max_length": 10})


def test_bad_data_fails_with_its_line_before_any_model_loads(
    tiny: store.StoredModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hardware, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat(1)) + "\n" + json.dumps(chat(2)) + '\n{"messages": [}\n')
    config = write_yaml(tmp_path / "job.yaml", {"model": "tiny", "train_file": str(bad)})
    result = CliRunner().invoke(single(train), [str(config)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "line 3" in result.stderr and "Traceback" not in result.output

    too_long = [chat(1), chat(2, reply="word " * 50)]
    with pytest.raises(DataFormatError) as err:
        bentoservice.AutoLLM.for_model("tiny").tuning(too_long, max_seq_length=48)
    assert err.value.line == 2 and "max_seq_length" in str(err.value)
    with pytest.raises(DataFormatError, match="preference"):
        bentoservice.AutoLLM.for_model("tiny").tuning([chat(1)], method="dpo")


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "packing"), [("sft", False), ("sft", True), ("dpo", False), ("orpo", False)])
def test_method_trains_a_loadable_adapter(
    method: str,
    packing: bool,
    tiny: store.StoredModel,
    tmp_path: Path,
    adapters: list[str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    rows = [chat(i) for i in range(6)] if method == "sft" else [pair(i) for i in range(6)]
    # Each accepted kind of training data: a list of rows, a datasets.Dataset, a file.
    data: Any = {
        "sft": rows,
        "dpo": datasets.Dataset.from_list(rows),
        "orpo": write_jsonl(tmp_path / "pairs.jsonl", rows),
    }[method]
    options = {"packing": True, "max_seq_length": 64} if packing else {}
    events: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING, logger="bentoservice"):
        result = bentoservice.AutoLLM.for_model("tiny").tuning(
            data, rows[:2], method=method, args={**QUICK, "fp16": True}, sink=events.append, **options
        )
    adapters.append(result.tag)

    assert "2/2 [" in capfd.readouterr().err  # the trainer's tqdm bar (a widget in a notebook) reached the last step
    assert "training in fp32 on the CPU" in caplog.text  # fp16 downgraded, not a crash
    assert result.adapter_path is not None and result.adapter_path.parent == store.fine_tune_dir("tiny", tiny.model_id)
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    assert (result.adapter_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert "eval_loss" in result.metrics
    assert lora_b_nonzero(tiny.path, result.adapter_path)
    config = json.loads((result.adapter_path / "adapter_config.json").read_text())
    trained_modules = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= trained_modules  # all-linear by default

    stored = store.get(result.tag)
    assert stored.kind == "adapter" and stored.base == "tiny" and stored.name.startswith(f"tiny-{method}-")
    assert stored.metadata["method"] == method and stored.metadata["lora"]["r"] == 16
    assert "train_loss" in stored.metadata["metrics"]

    steps = [e for e in events if e["type"] == "metrics" and "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    assert {"learning_rate", "grad_norm", "epoch", "eta_seconds"} <= set(steps[0])
    if method != "orpo":
        assert steps[0]["tokens_per_second"] > 0
    assert any(e["type"] == "checkpoint" and e["step"] == 2 for e in events)


def test_sft_changes_smollm2_greedy_output(smollm2: store.StoredModel, adapters: list[str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)

    def greedy(m: Any) -> str:
        prompt = [{"role": "user", "content": "What is the capital of France?"}]
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    before = greedy(model)
    questions = ["What is the capital of France?", "Name a color.", "How are you?", "Tell me a fact."]
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Purple elephants dance."}]}
        for q in questions
    ]
    llm = bentoservice.AutoLLM.for_model("smollm2", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    result = llm.tuning(rows, args={**QUICK, "max_steps": 6, "learning_rate": 2e-3, "save_strategy": "no"})
    adapters.append(result.tag)
    after = greedy(PeftModel.from_pretrained(model, result.adapter_path))
    assert before.startswith("The capital of France is Paris")
    assert after.startswith("Purple elephants"), after


def test_qlora_on_cpu_is_a_clear_error(tiny: store.StoredModel) -> None:
    llm = bentoservice.AutoLLM.for_model("tiny")
    with pytest.raises(TrainingError, match="QLoRA needs a CUDA GPU"):
        llm.prepare_for_training(adapter_type="qlora", r=8)
    with pytest.raises(TypeError, match="unknown LoRA option"):
        llm.prepare_for_training(rank=8)


def test_stop_then_resume_continues_from_the_checkpoint(
    tiny: store.StoredModel, tmp_path: Path, adapters: list[str]
) -> None:
    llm = bentoservice.AutoLLM.for_model("tiny").prepare_for_training(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    rows = [chat(i) for i in range(8)]
    args = {**QUICK, "max_steps": 5, "save_steps": 100, "output_dir": str(tmp_path / "out")}
    stop = threading.Event()
    first: list[dict[str, Any]] = []

    def stop_after_two(event: dict[str, Any]) -> None:
        first.append(event)
        if event.get("step", 0) >= 2:
            stop.set()

    stopped = llm.tuning(rows, args=args, sink=stop_after_two, stop=stop)
    assert stopped.stopped and stopped.adapter_path is None
    saved = [e["step"] for e in first if e["type"] == "checkpoint"]
    assert len(saved) == 1 and saved[0] < 5
    checkpoint = tmp_path / "out" / f"checkpoint-{saved[0]}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    (tmp_path / "out" / f"checkpoint-{saved[0] + 1}").mkdir()  # a newer one cut short by a crash: passed over

    second: list[dict[str, Any]] = []
    result = llm.tuning(rows, args=args, sink=second.append, resume=True)
    adapters.append(result.tag)
    steps = [e["step"] for e in second if e["type"] == "metrics" and "loss" in e]
    assert steps == list(range(saved[0] + 1, 6))
    assert result.adapter_path == tmp_path / "out" and lora_b_nonzero(tiny.path, result.adapter_path)
    assert json.loads((result.adapter_path / "adapter_config.json").read_text())["r"] == 8


def test_lazy_autollm_import() -> None:
    code = (
        "import sys, bentoservice; assert 'torch' not in sys.modules; "
        "bentoservice.AutoLLM; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- CLI -------------------------------------------------------------------------------------


def single(command: Any) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_train_then_fine_tune_get_and_list(tiny: store.StoredModel, tmp_path: Path, adapters: list[str]) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(4)])
    job = {"model": "tiny", "train_file": str(data), "r": 4, "epochs": 1, **QUICK, "max_steps": 1}
    runner = CliRunner()
    paths = []
    for name in ("cli-first", "cli-second"):
        result = runner.invoke(
            single(train), [str(write_yaml(tmp_path / f"{name}.yaml", {**job, "adapter_name": name}))]
        )
        assert result.exit_code == 0, result.output
        tag, path = result.stdout.strip().splitlines()[-1].split("\t")
        adapters.append(tag)
        assert tag.startswith(f"{name}:") and store.get(tag).base == "tiny"
        paths.append(path)

    got = runner.invoke(fine_tune_app, ["get", "tiny"])
    assert got.exit_code == 0 and got.stdout.strip() == paths[1]
    listed = runner.invoke(fine_tune_app, ["list"]).stdout.splitlines()
    assert [line.split("\t")[2] for line in listed if line.split("\t")[2] in paths] == paths
    assert all(line.startswith("tiny\t") for line in listed if line.split("\t")[2] in paths)

    missing = runner.invoke(fine_tune_app, ["get", "nosuchmodel"])
    assert missing.exit_code == 1 and missing.stderr.count("\n") == 1 and "no finished fine-tune" in missing.stderr
    bad = runner.invoke(single(train), [str(write_yaml(tmp_path / "bad.yaml", {**job, "r": "many"}))])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: bad.yaml: r:") and bad.stderr.count("\n") == 1
