"""EncoderConfig: a fine-tune of a rerank (cross-encoder) or embedding (bi-encoder) model. No torch in here:
the HTTP layer builds these for jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bentoservice.training.config import FineTuneChecks
from bentoservice.training.methods.evaluation import Evaluation

EncoderMethod = Literal["rerank", "embedding"]
ENCODER_METHODS: tuple[str, ...] = ("rerank", "embedding")
# Measured on 48 synthetic queries (24 steps of 8 groups of 4): a fresh scoring head learns at 1e-4 in full
# (5e-5, OPEA's default, hardly moves it); LoRA on the encoder needs 1e-3 (3e-4 hardly moves it).
FULL_LEARNING_RATE = 1e-4
LORA_LEARNING_RATE = 1e-3


class EncoderLora(BaseModel):
    """LoRA on the encoder; the result is merged into the stored model, so it serves like a full fine-tune."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class EncoderConfig(FineTuneChecks):
    """`method="rerank"` trains a cross-encoder: each query against its positive and `group_size - 1` sampled
    negatives, softmax cross-entropy of the positive. `method="embedding"` trains a bi-encoder contrastively:
    each query against its group and every other passage in the batch (in-batch negatives), at `temperature`.
    Data: FlagEmbedding's JSONL (query, pos, neg); a query without negatives draws them from the other queries'
    passages. `lora=None` is a full fine-tune. `args` passes through to `transformers.TrainingArguments`."""

    model_config = ConfigDict(extra="forbid")

    method: EncoderMethod
    model: str = "minilm"
    """An embedding or rerank model in the store (name or hub id); a rerank fine-tune of an embedding model
    starts with a fresh scoring head."""
    train_file: Path | None = None
    test_file: Path | None = None
    adapter_name: str | None = None
    """Store name of the finished model (the key LLM configs use too); default `<base>-<method>-<version>`."""
    lora: EncoderLora | None = None
    group_size: int = Field(8, ge=2)
    """Passages per query: one positive and group_size - 1 negatives (FlagEmbedding's train_group_size)."""
    max_seq_length: int = Field(512, gt=0)
    """Rerank: tokens of a query and passage together."""
    query_max_len: int = Field(128, gt=0)
    passage_max_len: int = Field(128, gt=0)
    query_instruction: str | None = None
    passage_instruction: str | None = None
    temperature: float = Field(0.02, gt=0)
    """Embedding: the softmax temperature of the cosine similarities."""
    evaluation: Evaluation | None = None
    """Compare the model as training started with the fine-tune at the end (held-out loss, accuracy and MRR, the
    passage each ranks first for a few queries); `prompts_file` is a path to rerank data for those queries."""
    args: dict[str, Any] = {}

    @property
    def default_learning_rate(self) -> float:
        return FULL_LEARNING_RATE if self.lora is None else LORA_LEARNING_RATE
