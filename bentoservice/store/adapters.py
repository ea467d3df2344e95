"""Adapters: PEFT folders in the store (labelled with their base), where one comes from (a folder, a store tag, the
hub; confined to allowed folders over HTTP), and the folders fine-tunes write."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import fsspec

from bentoservice.config import cache_root, get_settings
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

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SOURCE_STAMP = ".source.json"
"""In a copy of an adapter at the source URL: that URL and the versions of its files when they were copied."""


def save_adapter(name: str, folder: Path, base: str, metadata: dict[str, Any] | None = None) -> StoredModel:
    """Put a PEFT adapter folder into the store, labelled kind=adapter and base=<base name>."""
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise StoreError(f"{folder} is not a PEFT adapter folder (missing {', '.join(missing)})")
    base_name = resolve_base(base).name
    with bentoml.models.create(
        name, labels={"kind": "adapter", "base": base_name}, metadata=dict(metadata or {})
    ) as ref:
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


class AdapterNotFound(StoreError):
    """An adapter id that resolves nowhere (a 404)."""


class UnsafeAdapterId(StoreError):
    """An adapter id that is not a safe name (a 400)."""


ACCEPTED_FORMS = (
    "a served adapter name as /v1/models lists it (e.g. ft:smollm2:pirate:59be0ad8), a model store "
    "tag (name or name:version), a folder name under BENTOSERVICE_ADAPTER_DIRS or at "
    "BENTOSERVICE_ADAPTER_SOURCE_URL"
)
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}(/[A-Za-z0-9._:@+-]{1,256})?")
_STORE_TAG = re.compile(r"[a-z0-9][a-z0-9._-]*(:[a-z0-9._-]+)?")


def check_adapter_id(ref: str) -> None:
    if not _SAFE_ID.fullmatch(ref) or ".." in ref:
        raise UnsafeAdapterId(
            f"{ref[:80]!r} is not a valid adapter id: letters, digits and . _ - : @ + only, at most one /, no '..'"
        )


def _folder_source(src: str, folder: Path, confined: bool, name: str | None = None) -> AdapterSource:
    if not folder.is_dir():
        raise StoreError(f"no adapter folder at {src!r}")
    if confined:
        _check_confined(src, folder, [store_root(), *get_settings().adapter_dirs])
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise StoreError(f"{src!r} is not a PEFT adapter folder (missing {', '.join(missing)})")
    return AdapterSource(folder, name or default_name(folder.name), _declared_base(folder))


def _stored_adapter(src: str) -> AdapterSource | None:
    if not _STORE_TAG.fullmatch(src):  # e.g. ft:base:suffix:id, which BentoML refuses as an invalid tag
        return None
    try:
        stored = get(src)
    except StoreError:
        return None
    if stored.kind != "adapter":
        raise StoreError(f"{src!r} is a {stored.kind} model, not an adapter")
    return AdapterSource(stored.path, stored.name, stored.base)


def _remote_adapter(src: str) -> AdapterSource | None:
    """An adapter folder at BENTOSERVICE_ADAPTER_SOURCE_URL (fsspec: file://, s3://, ...), copied into the cache."""
    url = get_settings().adapter_source_url
    if not url:
        return None
    fs, root = fsspec.url_to_fs(url)
    remote = f"{root.rstrip('/')}/{src}"
    if not all(fs.isfile(f"{remote}/{f}") for f in ADAPTER_FILES):
        return None
    local = cache_root() / "adapter_source" / src.replace("/", "--")
    _fetch(f"{url.rstrip('/')}/{src}", local)
    return AdapterSource(local, src, _declared_base(local))


def _fetch(url: str, local: Path) -> None:
    """Copy an adapter folder at `url` into `local`, unless the copy there has the versions the source has now
    (fsspec's ukey of each file: the ETag on S3, a hash of size and mtime on a file system)."""
    fs, remote = fsspec.url_to_fs(url)
    # read before the copy: a file that changes during it is fetched again next time
    versions = {file: fs.ukey(f"{remote}/{file}") for file in ADAPTER_FILES}
    stamp = local / SOURCE_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("versions") == versions:
        return
    local.mkdir(parents=True, exist_ok=True)
    for file in ADAPTER_FILES:
        partial = local / f".{file}.part"
        fs.get_file(f"{remote}/{file}", str(partial))
        partial.rename(local / file)
    stamp.write_text(json.dumps({"url": url, "versions": versions}))


def catalogued_folder(where: str) -> Path:
    """The folder to read a served adapter from, given where it was found (a folder, or a store tag). A folder is
    read as it is (its base was checked when it was found); a copy of an adapter at the source URL is first fetched
    again if it changed there, and read as it is if the source cannot be reached."""
    if not looks_like_path(where):
        return adapter_source(where).folder
    folder = Path(where).expanduser()
    stamp = folder / SOURCE_STAMP
    if stamp.is_file():
        url = json.loads(stamp.read_text())["url"]
        try:
            _fetch(url, folder)
        except OSError as exc:
            log.warning("could not check the adapter at %s (%s): serving the copy fetched before", url, exc)
    return folder


def adapter_source(
    src: str, confined: bool = False, known: Mapping[str, str] | None = None, paths: bool = True, hub: bool = True
) -> AdapterSource:
    """The one resolution of an adapter id, for the routes and the on-demand loader.

    Accepted, in order: a PEFT folder path (when `paths`; `confined`, for requests over HTTP: only inside the
    model store or BENTOSERVICE_ADAPTER_DIRS), a served name in `known` (name -> the id it was loaded from), a
    model store tag, a folder under BENTOSERVICE_ADAPTER_DIRS, one at BENTOSERVICE_ADAPTER_SOURCE_URL, a hub id
    (when `hub`). Raises UnsafeAdapterId (400) or AdapterNotFound (404), which say the accepted forms.
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", src):
        raise StoreError(f"{src!r} is a URL; give an adapter folder, a model store tag or a hub id")
    if paths and looks_like_path(src):
        return _folder_source(src, Path(src).expanduser(), confined)
    check_adapter_id(src)
    if known and src in known:
        return replace(adapter_source(known[src], False, hub=hub), name=src)
    found = _stored_adapter(src)
    for root in get_settings().adapter_dirs:
        if found is None and "/" not in src and (root / src / ADAPTER_FILES[0]).is_file():
            found = _folder_source(src, root / src, confined, name=src)
    found = found or _remote_adapter(src)
    if found is not None:
        return found
    if hub and src.count("/") == 1:
        return AdapterSource(download(src), default_name(src.split("/")[1]), None)
    forms = ACCEPTED_FORMS + (", a path to a PEFT folder inside those folders" if paths else "")
    raise AdapterNotFound(f"no adapter {src!r} was found; accepted: {forms}")


def servable_adapters(base: str) -> dict[str, str]:
    """Every adapter of `base` that can be served on request, name -> where it is: the store's (newest version of
    each name), the folders under BENTOSERVICE_ADAPTER_DIRS and at BENTOSERVICE_ADAPTER_SOURCE_URL."""
    found = {m.name: m.tag for m in adapters_of(base)}
    for root in get_settings().adapter_dirs:
        for config in sorted(root.glob(f"*/{ADAPTER_FILES[0]}")):
            if _SAFE_ID.fullmatch(config.parent.name) and _declared_base(config.parent) in (base, None):
                found.setdefault(config.parent.name, str(config.parent))
    url = get_settings().adapter_source_url
    if url:
        fs, root = fsspec.url_to_fs(url)
        for entry in fs.ls(root, detail=False) if fs.isdir(root) else []:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if _SAFE_ID.fullmatch(name):
                found.setdefault(name, f"{url.rstrip('/')}/{name}")
    return found


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
