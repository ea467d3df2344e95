"""Fine-tune a rerank model (cross-encoder) or an embedding model (bi-encoder) on FlagEmbedding's data with the
HF Trainer, so checkpoints, resuming, progress events and stopping work as they do for LLM fine-tunes."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from bentoservice import store
from bentoservice.engine.embeddings import (
    SENTENCE_FILES,
    Pooling,
    as_features,
    embed_batch,
    load_encoder_model,
    read_pooling,
    score_batch,
)
from bentoservice.training import hardware
from bentoservice.training.config import TrainingError
from bentoservice.training.data import formats
from bentoservice.training.jobs.callbacks import ProgressCallback, Sink, StopFlag
from bentoservice.training.methods.encoder_config import EncoderConfig
from bentoservice.training.methods.evaluation import held_out
from bentoservice.training.methods.runs import (
    TrainingResult,
    default_adapter_name,
    last_checkpoint,
    train_and_evaluate,
)

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class Groups(Dataset):
    """Each query with its group: one positive passage, then group_size - 1 negatives. For training they are
    drawn at random on every visit (the Trainer seeds `random`); for evaluation the group is fixed: the first
    positive and the negatives in order. A query without negatives takes passages of the other queries."""

    def __init__(self, data: formats.Dataset, config: EncoderConfig, sample: bool) -> None:
        self.rows, self.size, self.sample = data.rows, config.group_size, sample
        self.query_instruction = config.query_instruction or ""
        self.passage_instruction = config.passage_instruction or ""
        if len(self.rows) < 2 and not all(row["neg"] for row in self.rows):
            raise TrainingError("a query without negatives (neg) needs other queries to draw them from")

    def __len__(self) -> int:
        return len(self.rows)

    def _negatives(self, i: int, count: int) -> list[str]:
        own = self.rows[i]["neg"]
        if own and self.sample:
            return random.sample(own * math.ceil(count / len(own)), count)
        if own:
            return [own[k % len(own)] for k in range(count)]
        others = [j for j in range(len(self.rows)) if j != i]
        picked = random.choices(others, k=count) if self.sample else [others[k % len(others)] for k in range(count)]
        return [self.rows[j]["pos"][0] for j in picked]

    def group(self, i: int) -> tuple[str, list[str]]:
        """Query i and its passages (the positive first), without the instructions."""
        row = self.rows[i]
        positive = random.choice(row["pos"]) if self.sample else row["pos"][0]
        return row["query"], [positive, *self._negatives(i, self.size - 1)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        query, passages = self.group(i)
        return {
            "query": self.query_instruction + query,
            "passages": [self.passage_instruction + p for p in passages],
        }


def rerank_collator(tokenizer: PreTrainedTokenizerBase, config: EncoderConfig) -> Callable[[list[dict]], Batch]:
    """Every (query, passage) pair of the batch's groups, group after group, cut to max_seq_length."""

    def collate(items: list[dict[str, Any]]) -> Batch:
        queries = [item["query"] for item in items for _ in item["passages"]]
        passages = [passage for item in items for passage in item["passages"]]
        return dict(
            tokenizer(
                queries, passages, truncation=True, max_length=config.max_seq_length, padding=True, return_tensors="pt"
            )
        )

    return collate


def embedding_collator(tokenizer: PreTrainedTokenizerBase, config: EncoderConfig) -> Callable[[list[dict]], Batch]:
    """The batch's queries, then every passage of their groups, as one batch (one forward pass)."""

    def collate(items: list[dict[str, Any]]) -> Batch:
        queries = tokenizer([item["query"] for item in items], truncation=True, max_length=config.query_max_len)
        passages = tokenizer(
            [p for item in items for p in item["passages"]], truncation=True, max_length=config.passage_max_len
        )
        return dict(tokenizer.pad(as_features(queries) + as_features(passages), return_tensors="pt"))

    return collate


class EncoderTrainer(Trainer):
    """Rerank: softmax cross-entropy of each group's positive among its passages. Embedding: InfoNCE of each
    query against every passage of the batch (its own group's negatives and the other groups' passages).
    Evaluation also reports `accuracy` (how often the positive scores highest within its own group) and `mrr`
    (the mean of 1 / the positive's rank in its group); its predictions are each group's scores."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it over gradient accumulation

    def __init__(self, *args: Any, config: EncoderConfig, pooling: Pooling, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config, self.pooling = config, pooling

    def _loss_and_scores(self, model: PreTrainedModel, inputs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.group_size
        if self.config.method == "rerank":
            scores = score_batch(model, inputs).view(-1, size)
            return torch.nn.functional.cross_entropy(scores, scores.new_zeros(len(scores), dtype=torch.long)), scores
        vectors = embed_batch(model, inputs, self.pooling)
        n = len(vectors) // (1 + size)
        similarities = vectors[:n] @ vectors[n:].T / self.config.temperature
        rows = torch.arange(n, device=vectors.device)
        loss = torch.nn.functional.cross_entropy(similarities, rows * size)
        return loss, similarities.view(n, n, size)[rows, rows]

    def compute_loss(
        self, model: PreTrainedModel, inputs: Batch, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, scores = self._loss_and_scores(model, inputs)
        return (loss, {"scores": scores}) if return_outputs else loss

    def prediction_step(
        self, model: PreTrainedModel, inputs: Batch, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, scores = self._loss_and_scores(model, inputs)
        positives = scores.new_zeros(len(scores), dtype=torch.long)  # the positive is first in every group
        return loss.detach(), None if prediction_loss_only else scores.detach(), positives


def group_metrics(prediction: EvalPrediction) -> dict[str, float]:
    scores = torch.as_tensor(prediction.predictions)
    positive = scores[:, :1]  # the positive is first in every group
    ranks = 1 + (scores > positive).sum(dim=1)
    return {"accuracy": float((ranks == 1).float().mean()), "mrr": float((1 / ranks).mean())}


# --- the before/after evaluation ---------------------------------------------------------------


def compare_encoders(
    trainer: EncoderTrainer,
    base_trainer: EncoderTrainer,
    test: Groups | None,
    shown: Groups | None,
    samples: int,
    after: dict[str, Any],
) -> dict[str, Any]:
    """The base (`base_trainer`'s model: the model as training started) against the fine-tune: held-out loss,
    accuracy and MRR on `test`, and for the first `samples` queries of `shown` the passage each ranks first."""
    summary: dict[str, Any] = {"method": trainer.config.method}
    if test is not None:
        summary.update(
            base=held_out(base_trainer.predict(test, metric_key_prefix="eval").metrics), adapter=held_out(after)
        )
    if shown is None:
        summary["samples"] = []
        return summary
    picked = Subset(shown, range(min(samples, len(shown))))
    base_top, top = (
        torch.as_tensor(t.predict(picked).predictions).argmax(-1).tolist() for t in (base_trainer, trainer)
    )
    groups = [shown.group(i) for i in picked.indices]
    summary["samples"] = [
        {"prompt": query, "base": passages[b], "adapter": passages[a], "reference": passages[0]}
        for (query, passages), b, a in zip(groups, base_top, top, strict=True)
    ]
    log.info("evaluation: %s", {k: v for k, v in summary.items() if k != "samples"})
    return summary


# --- running ---------------------------------------------------------------------------------


def run_encoder_training(
    config: EncoderConfig, sink: Sink | None = None, stop: StopFlag | None = None, resume: bool = False
) -> TrainingResult:
    """Train on `config.train_file` (evaluating on `config.test_file`); see `train_encoder`."""
    if config.train_file is None:
        raise TrainingError("train_file is required")
    train = formats.load_file(config.train_file, expect="rerank")
    test = formats.load_file(config.test_file, expect="rerank") if config.test_file else None
    shown = config.evaluation.prompts_file if config.evaluation else None
    prompts = formats.load_file(shown, expect="rerank") if shown else None
    return train_encoder(config, train, test, sink=sink, stop=stop, resume=resume, prompts=prompts)


def _load(config: EncoderConfig, base: store.StoredModel) -> PreTrainedModel:
    model = load_encoder_model(base.path, config.method)
    if config.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    # SEQ_CLS also trains (and saves) the fresh scoring head in full.
    task_type = "SEQ_CLS" if config.method == "rerank" else "FEATURE_EXTRACTION"
    return get_peft_model(model, LoraConfig(task_type=task_type, **config.lora.model_dump()))


def _plain(value: Any) -> Any:
    """Store metadata: JSON values without nulls (BentoML cannot read a model whose metadata holds one)."""
    value = json.loads(json.dumps(value, default=str))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return [_plain(v) for v in value] if isinstance(value, list) else value


def train_encoder(
    config: EncoderConfig,
    train: formats.Dataset,
    test: formats.Dataset | None = None,
    sink: Sink | None = None,
    stop: StopFlag | None = None,
    resume: bool = False,
    prompts: formats.Dataset | None = None,
) -> TrainingResult:
    """Fine-tune and store the model (kind=rerank or kind=embedding, labelled with its base).

    `sink` receives progress events (with a validation set: its loss, accuracy and MRR before training too);
    training stops, saving a checkpoint, once `stop` is set; `resume=True` continues from the output folder's
    newest checkpoint. With `config.evaluation`, the base is compared with the fine-tune at the end (on `test`;
    the samples from `prompts`, else `test`). A LoRA fine-tune is merged before it is stored.
    """
    from transformers import AutoTokenizer, set_seed

    for data in [d for d in (train, test, prompts) if d is not None]:
        if data.kind != "rerank":
            raise formats.DataFormatError(
                f"this is {data.kind} data but a {config.method} fine-tune needs rerank data (query, pos, neg)"
            )
    base = store.ensure_encoder(config.model, import_as=config.method)
    device = hardware.detect_device()
    if device == "hpu":
        raise TrainingError("rerank and embedding fine-tunes run on the CPU or a CUDA GPU, not on Gaudi")
    output_dir = Path(config.args.get("output_dir") or store.new_fine_tune_path(base.name, base.model_id))
    evaluation = {"eval_strategy": "epoch", "eval_on_start": True} if test is not None else {}
    args = {
        "learning_rate": config.default_learning_rate,
        "report_to": "none",
        "save_total_limit": 2,
        "include_num_input_tokens_seen": "non_padding",
        **evaluation,
        **config.args,
        **hardware.precision(device, config.args),
        "output_dir": str(output_dir),
        "remove_unused_columns": False,
    }
    checkpoint = args.pop("resume_from_checkpoint", None)
    if checkpoint is None and resume:
        checkpoint = last_checkpoint(output_dir)
    training_args = TrainingArguments(**args)
    set_seed(training_args.seed)  # before loading: a fresh scoring head starts the same on every run
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    collator = rerank_collator if config.method == "rerank" else embedding_collator
    progress = ProgressCallback(sink, stop)
    log.info(
        "fine-tuning %s as a %s model (%s) on %s into %s",
        base.name,
        config.method,
        "full" if config.lora is None else "LoRA",
        device,
        output_dir,
    )
    pooling = read_pooling(base.path)

    def make_trainer(model: PreTrainedModel, arguments: TrainingArguments, **kwargs: Any) -> EncoderTrainer:
        return EncoderTrainer(
            model=model,
            args=arguments,
            data_collator=collator(tokenizer, config),
            processing_class=tokenizer,
            compute_metrics=group_metrics,
            config=config,
            pooling=pooling,
            **kwargs,
        )

    test_groups = Groups(test, config, False) if test is not None else None
    trainer = make_trainer(
        _load(config, base),
        training_args,
        train_dataset=Groups(train, config, True),
        eval_dataset=test_groups,
        callbacks=[progress],
    )
    metrics = train_and_evaluate(trainer, checkpoint, progress, evaluate=test is not None)
    if progress.stopped:
        return TrainingResult(None, None, metrics, output_dir, stopped=True)
    compared = None
    if config.evaluation is not None:
        set_seed(training_args.seed)  # the base as training started: the same fresh scoring head
        predicting = TrainingArguments(**{**args, "report_to": "none", "eval_strategy": "no", "eval_on_start": False})
        shown = Groups(prompts, config, False) if prompts is not None else test_groups
        base_trainer = make_trainer(_load(config, base), predicting)
        compared = compare_encoders(trainer, base_trainer, test_groups, shown, config.evaluation.samples, metrics)
    model = trainer.model.merge_and_unload() if config.lora is not None else trainer.model
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if config.method == "embedding":  # keep it a sentence-transformers folder: same pooling, same input length
        for name in SENTENCE_FILES:
            if (base.path / name).is_file():
                (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base.path / name, output_dir / name)
    metadata = {
        "method": config.method,
        "lora": config.lora.model_dump() if config.lora else "none (full)",
        "training": args,
        "metrics": metrics,
    }
    stored = store.save_encoder(
        config.adapter_name or default_adapter_name(base.name, config.method, output_dir),
        output_dir,
        config.method,
        base,
        _plain(metadata),
    )
    log.info("saved %s model %s (%s)", config.method, stored.tag, output_dir)
    return TrainingResult(output_dir, stored.tag, metrics, output_dir, evaluation=compared)
