"""What the service serves at start: the base model the settings name, its adapters (the fine-tune path variable,
BENTOSERVICE_ADAPTERS) and the embedding and rerank models."""

from __future__ import annotations

import logging
import os

from bentoservice import store
from bentoservice.config import AdapterSpec, Settings, fine_tune_path_var
from bentoservice.engine import tool_parsers
from bentoservice.engine.embeddings import EncoderRegistry
from bentoservice.engine.served import ServedModel

logger = logging.getLogger(__name__)


def served_model(settings: Settings) -> ServedModel:
    """The base model (imported first when a card says where from) with its adapters loaded."""
    stored = store.ensure_base(settings.model)
    card = store.card_for(stored.name)
    template, tools = (card.chat_template, card.tool_format) if card else (None, tool_parsers.DEFAULT)
    served = ServedModel(stored.name, stored.model_id, stored.path, settings, template, tools)
    fine_tune = os.environ.get(fine_tune_path_var(served.name))
    specs = ([AdapterSpec(id=fine_tune)] if fine_tune else []) + settings.adapters
    for spec in specs:
        name = served.load_adapter_from(spec.id, spec.name)
        if served.default_adapter is None:
            served.set_default_adapter(name)
    return served


def encoder_registry(settings: Settings) -> EncoderRegistry:
    """The embedding and rerank models named in the settings. When none is named, the default (minilm) is skipped
    with a warning if it cannot load; a model the user named must load."""
    encoders = EncoderRegistry(settings)
    for kind, names in (("embedding", settings.embedding_models), ("rerank", settings.rerank_models)):
        for name in names:
            try:
                encoders.load(store.ensure_encoder(name, kind))
            except Exception as exc:
                if f"{kind}_models" in settings.model_fields_set:
                    raise
                logger.warning("not serving the %s model %s: %s", kind, name, exc)
    return encoders
