"""Adapters: PEFT folders in the store (labelled with their base), where one comes from (a folder, a store tag, the
hub; confined to allowed folders over HTTP), and the folders fine-tunes write."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml

from bentoservice.config import get_settings
from bentoservice.store.bases import resolve_base
from bentoservice.store.cards import card_for
from bentoservice.store.models import (
    StoredModel,
    StoreError,
    default_name,
    download,
    get,
    list_models,
    looks_like_path,
    store_root,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


# A store tag (name, name:version) or a hub id (owner/name), BentoML's and the hub's characters.
_NAME = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+|/[A-Za-z0-9_.-]+)?")


def adapter_source(src: str, confined: bool = False) -> AdapterSource:
    """Find an adapter given as a local PEFT folder, a store tag, or a hub id.

    `confined` (requests over HTTP): folders only inside the model store or BENTOSERVICE_ADAPTER_DIRS.
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", src):
        raise StoreError(f"{src!r} is a URL; give an adapter folder, a model store tag or a hub id")
    if looks_like_path(src):
        folder = Path(src).expanduser()
        if not folder.is_dir():
            raise StoreError(f"no adapter folder at {src!r}")
        if confined:
            _check_confined(src, folder, [store_root(), *get_settings().adapter_dirs])
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise StoreError(f"{src!r} is not a PEFT adapter folder (missing {', '.join(missing)})")
        return AdapterSource(folder, default_name(folder.name), _declared_base(folder))
    if not _NAME.fullmatch(src):
        raise StoreError(f"{src!r} is neither a folder, a model store tag (name or name:version) nor a hub id "
                         "(owner/name)")
    try:
        stored = get(src) if "/" not in src else None
    except StoreError:
        stored = None
    if stored is not None:
        if stored.kind != "adapter":
            raise StoreError(f"{src!r} is a {stored.kind} model, not an adapter")
        return AdapterSource(stored.path, stored.name, stored.base)
    if src.count("/") == 1:
        return AdapterSource(download(src), default_name(src.split("/")[1]), None)
    raise StoreError(f"{src!r} is neither an adapter folder, an adapter in the model store nor a hub id")


def fine_tune_dir(model: str, model_id: str) -> Path:
    """Where a fine-tune of `model` writes its adapters: <root>/<model>--<model-id with / as ->."""
    return get_settings().fine_tune_root / f"{model}--{model_id.replace('/', '-')}"


def new_fine_tune_path(model: str, model_id: str) -> Path:
    version = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
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
