"""Where this project keeps its state on this machine, for `bentoservice state` and `bentoservice reset`.

The state is bentoservice's models in the BentoML model store (the ones it labelled with a `kind`: base models,
adapters, embedding and rerank models; other models in the same store are not ours), the data dir (SQLite,
uploads, jobs' folders), the fine-tune output folders and the compiled CPU kernels. A database or file store given
by URL may be shared with other replicas: `reset` leaves it alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import bentoml
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bentoservice import store
from bentoservice.config import Settings, cache_root
from bentoservice.training.jobs import store as jobs_store


@dataclass(frozen=True)
class Location:
    what: str
    where: str
    set_by: str
    deletable: bool
    """A folder or file of this project on this machine, which `reset` deletes."""


def sqlite_file(settings: Settings) -> Path | None:
    """The database's file when it is SQLite (the default), else None."""
    url = make_url(settings.database_url or f"sqlite:///{settings.data_dir / 'bentoservice.db'}")
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def locations(settings: Settings) -> list[Location]:
    database = sqlite_file(settings)
    url = settings.database_url
    shown_database = make_url(url).render_as_string() if database is None and url else str(database)
    return [
        Location("BentoML home", str(store.bentoml_home()), "BENTOML_HOME", False),
        Location(
            "model store: base models, adapters, embedding and rerank models",
            str(store.store_root()),
            "BENTOML_HOME",
            False,
        ),
        Location("data dir", str(settings.data_dir), "BENTOSERVICE_DATA_DIR", True),
        Location(
            "database: files, jobs, events, checkpoints",
            shown_database,
            "BENTOSERVICE_DATABASE_URL",
            database is not None,
        ),
        Location(
            "file store: uploads, jobs' results",
            settings.files_url or str(settings.files_dir),
            "BENTOSERVICE_FILES_URL",
            settings.files_url is None,
        ),
        Location("jobs' folders: checkpoints while training", str(settings.jobs_dir), "BENTOSERVICE_DATA_DIR", True),
        Location("fine-tune output root", str(settings.fine_tune_root), "XDG_CACHE_HOME", True),
        Location("native-kernel cache", str(cache_root() / "native"), "XDG_CACHE_HOME", True),
    ]


def our_models() -> list[bentoml.Model]:
    """Every version of every model bentoservice put in the store."""
    return [model for model in bentoml.models.list() if "kind" in (model.info.labels or {})]


def counts(settings: Settings) -> dict[str, int]:
    """Models in the store by kind (names, not versions), jobs and files in the database."""
    names: dict[str, set[str]] = {"base": set(), "adapter": set()}
    for model in our_models():
        names.setdefault(model.info.labels["kind"], set()).add(model.tag.name)
    numbers = {"adapters" if kind == "adapter" else f"{kind} models": len(found) for kind, found in names.items()}
    database = sqlite_file(settings)
    if database is not None and not database.exists():  # reading must not create an empty database
        return {**numbers, "jobs": 0, "files": 0}
    with jobs_store.database().connect() as conn:
        numbers["jobs"] = conn.execute(select(func.count()).select_from(jobs_store.jobs)).scalar_one()
        numbers["files"] = conn.execute(
            select(func.count()).select_from(jobs_store.files).where(jobs_store.files.c.deleted == 0)
        ).scalar_one()
    return numbers


def deletable_paths(settings: Settings) -> list[Path]:
    """The project's folders and files on this machine, none inside another."""
    paths = [Path(location.where) for location in locations(settings) if location.deletable]
    if database := sqlite_file(settings):
        paths += [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm")]
    return [path for path in paths if not any(path != other and path.is_relative_to(other) for other in paths)]


def reset(settings: Settings) -> list[str]:
    """Delete the project's state on this machine; returns what was deleted, one line each."""
    deleted = []
    for model in our_models():
        bentoml.models.delete(model.tag)
        deleted.append(f"model {model.tag}")
    jobs_store.database.cache_clear()
    for path in deletable_paths(settings):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(str(path))
    return deleted
