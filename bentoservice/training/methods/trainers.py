"""Run a fine-tune: validate the data, load the base, train a LoRA adapter with TRL, save it to the store."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from bentoservice.engine import tool_parsers
from bentoservice.engine.templates import renders_tools
from bentoservice.training import hardware
from bentoservice.training.config import TrainingConfig, TrainingError, trl_config_class
from bentoservice.training.data import formats
from bentoservice.training.data.labels import IGNORE
from bentoservice.training.jobs.callbacks import ProgressCallback, Sink, StopFlag
from bentoservice.training.methods import evaluation
from bentoservice.training.methods.runs import (
    Run,
    TrainingResult,
    finish_run,
    last_checkpoint,
    train_and_evaluate,
)
from bentoservice.training.speed import plan as speed
from bentoservice.training.speed.trainer import sft_trainer_class

if TYPE_CHECKING:
    import datasets
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from bentoservice import store

    TrainData: TypeAlias = formats.Dataset | datasets.Dataset | list[dict[str, Any]] | str | Path

log = logging.getLogger(__name__)

KIND: dict[str, formats.Kind] = {"sft": "sft", "dpo": "preference", "orpo": "preference"}


# --- inputs ----------------------------------------------------------------------------------


def resolve_base(model: str, model_id: str | None = None) -> store.StoredModel:
    """The stored base model; `model_id`, when given, must name the same model as `model`."""
    # Imported here, not at the top: the trainer itself runs without BentoML (bench/training.py on a GPU machine).
    from bentoservice import store

    base = store.ensure_base(model_id or model)
    if model_id and model not in (base.name, base.model_id):
        raise store.StoreError(f"{model_id!r} is stored as {base.name!r}, not as {model!r}")
    return base


def to_dataset(data: TrainData, kind: formats.Kind) -> formats.Dataset:
    """Training data given as a file path, a `datasets.Dataset` or a list of rows, validated and canonical."""
    if isinstance(data, formats.Dataset):
        if data.kind != kind:
            raise formats.DataFormatError(f"this is {data.kind} data but the method needs {kind} data")
        return data
    if isinstance(data, str | Path):
        return formats.load_file(data, expect=kind)
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    jsonl = "\n".join(json.dumps(row) for row in rows).encode()
    return formats.parse_bytes(jsonl, "rows", expect=kind)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise TrainingError(f"the tokenizer in {path} has no chat template to format the training data with")
    return tokenizer


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def tool_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A chat with tools or tool calls as the template takes it, in the tool format the server reads calls
    with (engine/tool_parsers.py), so that an adapter learns the calls the server will parse."""
    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages, None
    native = renders_tools(tokenizer.chat_template or "")
    return tool_parsers.tool_format(tool_parsers.DEFAULT).chat(messages, tools, native)


def token_counter(tokenizer: PreTrainedTokenizerBase, kind: formats.Kind) -> Callable[[dict[str, Any]], int]:
    """Tokens of a canonical row as trained: the chat, a prompt (to complete), or the longer of prompt+chosen and
    prompt+rejected."""
    if kind == "sft":

        def chat_tokens(row: dict[str, Any]) -> int:
            messages, tools = tool_chat(tokenizer, row["messages"], row.get("tools"))
            return len(render(tokenizer, messages, tools=tools))

        return chat_tokens
    if kind == "prompts":
        return lambda row: len(render(tokenizer, row["prompt"], add_generation_prompt=True))
    return lambda row: max(len(render(tokenizer, row["prompt"] + row[side])) for side in ("chosen", "rejected"))


def assistant_labels(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> dict[str, list[int]]:
    """Token ids of a chat and labels that train on the assistant turns only, every turn of a multi-turn chat.

    Works with any chat template, with or without `{% generation %}` markers: an assistant turn is the span
    between the chat rendered up to its generation prompt and the chat rendered up to the turn's end
    (including the end-of-turn token, so the model learns to stop).
    """
    messages, tools = tool_chat(tokenizer, messages, tools)
    ids = render(tokenizer, messages, tools=tools)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools), ids)
        end = _common_prefix(render(tokenizer, messages[: i + 1], tools=tools), ids)
        labels[start:end] = ids[start:end]
    if all(label == IGNORE for label in labels):
        raise TrainingError("the chat template renders no assistant tokens to train on")
    return {"input_ids": ids, "labels": labels}


def _common_prefix(ids: list[int], other: list[int]) -> int:
    # Not trl's common_prefix_length: the Gaudi path runs on transformers 4.55, which trl 1.x does not support.
    return next((i for i, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b), min(len(ids), len(other)))


def hf_dataset(tokenizer: PreTrainedTokenizerBase, data: formats.Dataset) -> datasets.Dataset:
    """SFT rows tokenized with assistant-only labels; preference rows as they are (TRL formats them)."""
    from datasets import Dataset

    if data.kind == "sft":
        return Dataset.from_list([assistant_labels(tokenizer, row["messages"], row.get("tools")) for row in data.rows])
    return Dataset.from_list(data.rows)


# --- trainers --------------------------------------------------------------------------------


def lora_config(config: TrainingConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias=config.bias,
        task_type="CAUSAL_LM",
    )


def training_args(config: TrainingConfig, device: hardware.Device, output_dir: Path) -> dict[str, Any]:
    """The TRL config's arguments: the config's, with the precision `device` supports."""
    # use_cpu: without it, processes launched data-parallel on a machine without GPUs would each train alone.
    cpu = {"use_cpu": True} if device == "cpu" else {}
    return {**config.trainer_args(), **hardware.precision(device, config.args), **cpu, "output_dir": str(output_dir)}


def build_trainer(
    config: TrainingConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: dict[str, Any],
    train: datasets.Dataset,
    test: datasets.Dataset | None,
    progress: ProgressCallback,
    device: hardware.Device,
    speedups: speed.Speedups | None = None,
) -> Trainer:
    """The trainer for `config.method`; SFT takes `speedups` (by default, all that pay on `device`)."""
    if device == "hpu":
        return _gaudi_sft_trainer(config, model, tokenizer, args, train, test, progress)
    if config.method == "sft":
        return _sft_trainer(config, model, tokenizer, args, train, test, progress, device, speedups)
    common = dict(
        model=model,
        args=trl_config_class(config.method)(**args),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[progress],
    )
    if config.method == "dpo":
        from trl import DPOTrainer

        return DPOTrainer(**common)
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(**common)


def _sft_trainer(
    config: TrainingConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: dict[str, Any],
    train: datasets.Dataset,
    test: datasets.Dataset | None,
    progress: ProgressCallback,
    device: hardware.Device,
    speedups: speed.Speedups | None,
) -> Trainer:
    from trl import SFTConfig

    from bentoservice.training.speed.graphs import ReleaseAtTheEnd, graph_decoder, graphable

    lengths = [len(ids) for ids in train["input_ids"]]
    speedups = speedups or speed.defaults(device, speed.planned_tokens(lengths, args))
    checkpointing_chosen = bool({"gradient_checkpointing", "activation_checkpointing"} & set(config.args))
    args = speed.sft_args(args, speedups, config.packing)
    padding_free = bool(args.get("padding_free") or config.packing)
    speed.prepare(model, padding_free)
    trainer = sft_trainer_class()(
        model=model,
        args=SFTConfig(**args),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=[progress],
    )
    trainer.labelled_logits = speedups.labelled_logits and padding_free
    checkpointing = bool(args.get("gradient_checkpointing") or args.get("activation_checkpointing"))
    sharded = bool(args.get("fsdp") or args.get("deepspeed"))
    if speedups.fused_loss and padding_free and not sharded and trainer.accelerator.num_processes == 1:
        from bentoservice.training.speed.fused_loss import plain_head

        trainer.head = plain_head(trainer.model.get_base_model())
    # Graphed passes take fused LoRA layers (no dropout) on one GPU, decided before the memory plan sizes the passes
    # for them. They replace compiling, which gave them nothing (docs/benchmarks.md) for minutes of compilation.
    graphs = (
        speedups.graphs
        and device == "cuda"
        and padding_free
        and config.lora_dropout == 0
        and speedups.fused_lora
        and not sharded
        and trainer.accelerator.num_processes == 1
        and graphable(trainer.model)
    )
    largest = speed.largest_batch(lengths, args)
    if not checkpointing_chosen:
        plan = speed.memory_plan(
            trainer.model,
            config.lora_dropout,
            speedups.liger or speedups.compile,
            device,
            longest=max(lengths) if speedups.passes else None,
            most=speed.graphed_pass_tokens(model) if graphs and speedups.passes else None,
        )
        checkpointing = bool(trainer.fit_memory(plan, largest))
        largest = plan.largest_pass(largest)
    if checkpointing:  # Inductor fails on checkpointed layers, and graphs are not captured over them
        speedups, graphs = replace(speedups, compile=False), False
    if sharded:  # they shard the weights the fused LoRA layers read
        speedups = replace(speedups, fused_lora=False)
    if graphs:
        speedups = replace(speedups, compile=False)
    speed.finish(trainer.model, speedups, mixed_precision=bool(args.get("bf16") or args.get("fp16")))
    if graphs:
        graphed = graph_decoder(trainer.model, int(args.get("per_device_train_batch_size", 8)), largest, max(lengths))
        trainer.pass_granularity = graphed.step
        trainer.add_callback(ReleaseAtTheEnd(graphed))
    return trainer


def _gaudi_sft_trainer(
    config: TrainingConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: dict[str, Any],
    train: datasets.Dataset,
    test: datasets.Dataset | None,
    progress: ProgressCallback,
) -> Trainer:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    plain = {k: v for k, v in args.items() if k in TrainingArguments.__dataclass_fields__}
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    return hardware.gaudi_trainer(get_peft_model(model, lora_config(config)), plain, train, test, collator, [progress])


def check_supported(config: TrainingConfig, device: hardware.Device) -> None:
    hardware.check_adapter_type(config.adapter_type, device)
    if device == "hpu" and (config.method != "sft" or config.packing):
        raise TrainingError("on Intel Gaudi only sft without packing is supported")


# --- running ---------------------------------------------------------------------------------


def run_training(
    config: TrainingConfig, sink: Sink | None = None, stop: StopFlag | None = None, resume: bool = False
) -> TrainingResult:
    """Train `config.train_file` (evaluating on `config.test_file`); see `train_on`."""
    if config.train_file is None:
        raise TrainingError("train_file is required")
    kind = KIND[config.method]
    train = formats.load_file(config.train_file, expect=kind)
    test = formats.load_file(config.test_file, expect=kind) if config.test_file else None
    return train_on(config, train, test, sink=sink, stop=stop, resume=resume)


def train_on(
    config: TrainingConfig,
    train: formats.Dataset,
    test: formats.Dataset | None = None,
    sink: Sink | None = None,
    stop: StopFlag | None = None,
    resume: bool = False,
) -> TrainingResult:
    """Fine-tune and store the adapter.

    The data is checked against max_seq_length before the model loads. `sink` receives progress events;
    training stops (saving a checkpoint) once `stop` is set. `resume=True` continues from the newest
    checkpoint in the output folder, when there is one (set `output_dir` in args to reuse a folder).
    """
    run = prepare_run(config, [train] if test is None else [train, test], sink, stop, resume)
    log.info(
        "fine-tuning %s (%s, %s) on %s into %s",
        run.base.name,
        config.method,
        config.adapter_type,
        run.device,
        run.output_dir,
    )
    model = hardware.load_model(run.base.path, run.device, config.adapter_type)
    trainer = build_trainer(
        config,
        model,
        run.tokenizer,
        run.args,
        hf_dataset(run.tokenizer, train),
        hf_dataset(run.tokenizer, test) if test is not None else None,
        run.progress,
        run.device,
    )
    metrics = train_and_evaluate(trainer, run.checkpoint, run.progress, evaluate=test is not None)

    def compare() -> dict[str, Any] | None:
        if config.evaluation is None:
            return None
        if trainer.accelerator.num_processes > 1:
            log.warning("the before/after evaluation runs in single-process trainings only; skipped")
            return None
        trainer.remove_callback(run.progress)  # the base's evaluation is no step of this run
        assert config.evaluation is not None
        prompts = (
            formats.load_file(config.evaluation.prompts_file, expect=train.kind)
            if config.evaluation.prompts_file
            else None
        )
        return evaluation.before_after(trainer, run.tokenizer, test, prompts, config.evaluation, metrics)

    return finish_run(config, run, trainer, metrics, compare)


def prepare_run(
    config: TrainingConfig, data: list[formats.Dataset], sink: Sink | None, stop: StopFlag | None, resume: bool
) -> Run:
    """The base and its tokenizer, `data` checked against max_seq_length (before the model loads), the output
    folder, the TRL config's arguments and the checkpoint to resume from."""
    from bentoservice import store

    base = resolve_base(config.model, config.model_id)
    device = hardware.detect_device()
    check_supported(config, device)
    tokenizer = load_tokenizer(base.path)
    for dataset in data:
        formats.check_lengths(dataset, token_counter(tokenizer, dataset.kind), config.max_seq_length)
    output_dir = Path(config.args.get("output_dir") or store.new_fine_tune_path(base.name, base.model_id))
    args = training_args(config, device, output_dir)
    checkpoint = args.pop("resume_from_checkpoint", None)
    if checkpoint is None and resume:
        checkpoint = last_checkpoint(output_dir)
    return Run(base, device, tokenizer, output_dir, args, checkpoint, ProgressCallback(sink, stop))
