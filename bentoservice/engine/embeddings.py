"""Embedding models (bi-encoders) and rerank models (cross-encoders): how each turns text into vectors or
scores, for serving and for training alike, and the registry of those served."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from bentoservice import store
from bentoservice.config import Settings
from bentoservice.engine.errors import ContextOverflow
from bentoservice.engine.served import pick_device, pick_dtype

log = logging.getLogger(__name__)

Kind = Literal["embedding", "rerank"]
Pooling = Literal["mean", "cls", "max"]
BATCH = 32
"""Texts (or query-passage pairs) per forward pass."""
# sentence-transformers' files that say how a folder's model pools and how long its inputs may be.
POOLING_CONFIG = "1_Pooling/config.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
SENTENCE_FILES = ("modules.json", "config_sentence_transformers.json", SENTENCE_CONFIG, POOLING_CONFIG)
POOLING_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
}


def read_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares; mean (their default) when it declares none."""
    file = folder / POOLING_CONFIG
    if not file.is_file():
        return "mean"
    config = json.loads(file.read_text())
    return next((mode for key, mode in POOLING_MODES.items() if config.get(key)), "mean")


def max_input_tokens(folder: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    """sentence-transformers' max_seq_length where the folder has one, else what the model's positions allow."""
    file = folder / SENTENCE_CONFIG
    declared = json.loads(file.read_text()).get("max_seq_length") if file.is_file() else None
    if declared:
        return int(declared)
    positions = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(tokenizer.model_max_length, positions)


def as_features(encoded: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A tokenizer's batch output as one dict per text, as `tokenizer.pad` takes them."""
    return [dict(zip(encoded.keys(), values, strict=False)) for values in zip(*encoded.values(), strict=False)]


def embed_batch(model: PreTrainedModel, batch: dict[str, torch.Tensor], pooling: Pooling) -> torch.Tensor:
    """Unit-length embeddings of a tokenized batch."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def score_batch(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One relevance logit per tokenized query-passage pair."""
    return model(**batch).logits.squeeze(-1).float()


def load_encoder_model(folder: Path, kind: Kind, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The bare encoder of an embedding model, or the cross-encoder of a rerank model: one relevance logit
    per pair, from the folder's own head, or a fresh head when the folder holds a bare encoder."""
    if kind == "embedding":
        return AutoModel.from_pretrained(folder, dtype=dtype)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)


class Encoder:
    """One served embedding or rerank model. Calls are serialised per model (a fast tokenizer must not be
    used by two threads at once)."""

    def __init__(
        self,
        name: str,
        kind: Kind,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_tokens: int,
        pooling: Pooling = "mean",
        source: str = "",
        parent: str | None = None,
        aliases: Iterable[str] = (),
    ) -> None:
        self.name, self.kind, self.source, self.parent = name, kind, source, parent
        self.aliases = {name, *aliases}
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_tokens, self.pooling = max_tokens, pooling
        self._lock = threading.Lock()

    @classmethod
    def load(cls, name: str, stored: store.StoredModel, settings: Settings) -> Encoder:
        if stored.kind not in store.ENCODER_KINDS:
            raise store.StoreError(f"{stored.name!r} is a {stored.kind} model, not an embedding or rerank model")
        kind = cast(Kind, stored.kind)  # one of ENCODER_KINDS, checked above
        device = pick_device(settings.device)
        model = load_encoder_model(stored.path, kind, pick_dtype(settings.dtype, device)).to(device)
        tokenizer = AutoTokenizer.from_pretrained(stored.path)
        log.info("serving %s model %s from %s on %s", stored.kind, name, stored.path, device)
        return cls(
            name,
            kind,
            model,
            tokenizer,
            max_input_tokens(stored.path, tokenizer, model),
            read_pooling(stored.path),
            stored.model_id,
            stored.base,
            {stored.name, stored.model_id},
        )

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def _batches(self, encoded: dict[str, list[Any]]) -> Iterator[dict[str, torch.Tensor]]:
        features = as_features(encoded)
        for start in range(0, len(features), BATCH):
            batch = self.tokenizer.pad(features[start : start + BATCH], return_tensors="pt")
            yield {k: v.to(self.model.device) for k, v in batch.items()}

    def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        """Unit-length embeddings and the tokens read; a text longer than the model takes is refused unless
        `truncate`."""
        vectors: list[list[float]] = []
        with self._lock, torch.inference_mode():
            encoded = self.tokenizer(texts, truncation=truncate, max_length=self.max_tokens if truncate else None)
            lengths = [len(ids) for ids in encoded["input_ids"]]
            too_long = next((i for i, n in enumerate(lengths) if n > self.max_tokens), None)
            if too_long is not None:
                raise ContextOverflow(
                    f"input[{too_long}] is {lengths[too_long]} tokens long, more than the "
                    f"{self.max_tokens} tokens {self.name} takes; shorten it or set truncate"
                )
            for batch in self._batches(encoded):
                vectors += embed_batch(self.model, batch, self.pooling).tolist()
        return vectors, sum(lengths)

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Each document's relevance to the query, from 0 to 1 (the sigmoid of the model's logit), and the
        tokens read; a pair longer than the model takes is cut, the longer of query and document first."""
        scores: list[float] = []
        with self._lock, torch.inference_mode():
            encoded = self.tokenizer([query] * len(documents), documents, truncation=True, max_length=self.max_tokens)
            for batch in self._batches(encoded):
                scores += torch.sigmoid(score_batch(self.model, batch)).tolist()
        return scores, sum(len(ids) for ids in encoded["input_ids"])


class EncoderRegistry:
    """The embedding and rerank models this server serves, by name; the first of each kind is its default."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, Encoder] = {}
        self._lock = threading.Lock()

    def load(self, stored: store.StoredModel, name: str | None = None) -> Encoder:
        """Serve a stored model under `name` (default its store name), replacing one of that name."""
        name = name or stored.name
        if name not in self._models and len(self._models) >= self.settings.max_encoders:
            raise ValueError(
                f"{len(self._models)} embedding and rerank models are served already, the most "
                f"BENTOSERVICE_MAX_ENCODERS allows"
            )
        encoder = Encoder.load(name, stored, self.settings)
        with self._lock:
            self._models[name] = encoder
        return encoder

    def all(self) -> list[Encoder]:
        with self._lock:
            return list(self._models.values())

    def find(self, name: str) -> Encoder | None:
        """By served name, store name or hub id."""
        found = [e for e in self.all() if name in e.aliases]
        return next((e for e in found if e.name == name), found[0] if found else None)

    def default(self, kind: Kind) -> Encoder | None:
        return next((e for e in self.all() if e.kind == kind), None)
