"""The job store: uploaded files, fine-tuning jobs, their events and checkpoints, in one SQL database.

SQLite in WAL mode under the data dir by default; any SQLAlchemy URL (e.g. PostgreSQL) works too.
Torch-free: the HTTP layer, the queue and the runner processes all use it.
"""

from __future__ import annotations

import secrets
import time
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)

from bentoservice.config import get_settings

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("format", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("deleted", Integer, nullable=False, default=0),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("model", Text, nullable=False),
    Column("request", JSON, nullable=False),  # the body as given, for the job object
    Column("config", JSON, nullable=False),  # the TrainingConfig fields the runner uses
    Column("fine_tuned_model", Text),
    Column("store_tag", Text),
    Column("error", JSON),
    Column("started_at", Integer),
    Column("finished_at", Integer),
    Column("trained_tokens", Integer),
    Column("pid", Integer),
    Column("host", Text),  # where the job trains: a host name (local processes) or ray:<submission id>
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Integer, nullable=False, default=0),
    Column("pause_requested", Integer, default=0),
    Column("estimated_finish", Integer),  # unix seconds, from the measured step rate while running
    Column("result_files", JSON),  # file ids (purpose fine-tune-results)
    Column("evaluation", JSON),  # the before/after summary (training.methods.evaluation)
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("level", String(16), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("metrics", JSON),
)

ACTIVE = ("validating_files", "queued", "running", "paused")
FINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _wal(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


@lru_cache
def database(url: str | None = None) -> Engine:
    settings = get_settings()
    url = url or settings.database_url or f"sqlite:///{settings.data_dir / 'bentoservice.db'}"
    if url.startswith("sqlite:///"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _wal)
    metadata.create_all(engine)
    _add_new_columns(engine)
    return engine


def _add_new_columns(engine: Engine) -> None:
    """Columns added since a database was created (all nullable), so an older database keeps working."""
    existing = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    kind = column.type.compile(engine.dialect)
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


class JobStore:
    def __init__(self, engine: Engine | None = None) -> None:
        self.db = engine or database()

    # -- files --------------------------------------------------------------------------------

    def add_file(self, **row: Any) -> dict[str, Any]:
        row = {"id": new_id("file"), "created_at": now(), "deleted": 0, **row}
        with self.db.begin() as conn:
            conn.execute(insert(files).values(**row))
        return row

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            found = conn.execute(select(files).where(files.c.id == file_id, files.c.deleted == 0)).mappings().first()
        return dict(found) if found else None

    def find_file(self, ref: str) -> dict[str, Any] | None:
        """By id, or (as OPEA's clients name files) by the newest upload of that filename."""
        by_id = self.get_file(ref)
        if by_id is not None:
            return by_id
        query = (
            select(files)
            .where(files.c.filename == ref, files.c.deleted == 0)
            .order_by(files.c.created_at.desc(), files.c.id.desc())
        )
        with self.db.connect() as conn:
            found = conn.execute(query).mappings().first()
        return dict(found) if found else None

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        query = select(files).where(files.c.deleted == 0).order_by(files.c.created_at.desc())
        if purpose:
            query = query.where(files.c.purpose == purpose)
        with self.db.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def delete_file(self, file_id: str) -> None:
        with self.db.begin() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(deleted=1))

    # -- jobs ---------------------------------------------------------------------------------

    def add_job(self, **row: Any) -> dict[str, Any]:
        row = {
            "id": new_id("ftjob"),
            "created_at": now(),
            "status": "validating_files",
            "attempts": 0,
            "cancel_requested": 0,
            **row,
        }
        with self.db.begin() as conn:
            conn.execute(insert(jobs).values(**row))
        added = self.get_job(row["id"])
        assert added is not None  # just inserted in the committed transaction above
        return added

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            found = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return dict(found) if found else None

    def list_jobs(
        self, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after` is the id of the last job of the previous page; `metadata` keeps the jobs whose
        metadata has each of those key-value pairs."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        for key, value in (metadata or {}).items():
            query = query.where(jobs.c.request["metadata"][key].as_string() == value)
        if after:
            anchor = self.get_job(after)
            if anchor is not None:
                query = query.where(
                    (jobs.c.created_at < anchor["created_at"])
                    | ((jobs.c.created_at == anchor["created_at"]) & (jobs.c.id < after))
                )
        with self.db.connect() as conn:
            rows = [dict(r) for r in conn.execute(query.limit(limit + 1)).mappings()]
        return rows[:limit], len(rows) > limit

    def jobs_in(self, *statuses: str) -> list[dict[str, Any]]:
        query = select(jobs).where(jobs.c.status.in_(statuses)).order_by(jobs.c.created_at, jobs.c.id)
        with self.db.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Update a job; with `only_if`, only while its status is one of those (returns whether it did)."""
        query = update(jobs).where(jobs.c.id == job_id)
        if only_if:
            query = query.where(jobs.c.status.in_(only_if))
        with self.db.begin() as conn:
            return conn.execute(query.values(**fields)).rowcount > 0

    # -- events and checkpoints ---------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        type: str = "message",
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.db.begin() as conn:
            conn.execute(
                insert(events).values(
                    job_id=job_id, created_at=now(), level=level, type=type, message=message, data=data
                )
            )

    def list_events(self, job_id: str, after: int | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, as OpenAI lists them; `after` is the sequence number of the last event seen."""
        query = select(events).where(events.c.job_id == job_id).order_by(events.c.seq.desc())
        if after is not None:
            query = query.where(events.c.seq < after)
        with self.db.connect() as conn:
            rows = [dict(r) for r in conn.execute(query.limit(limit + 1)).mappings()]
        return rows[:limit], len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, Any]) -> None:
        with self.db.begin() as conn:
            conn.execute(
                insert(checkpoints).values(
                    id=new_id("ftckpt"), job_id=job_id, created_at=now(), step=step, path=path, metrics=metrics
                )
            )

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        query = select(checkpoints).where(checkpoints.c.job_id == job_id).order_by(checkpoints.c.step.desc())
        with self.db.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]
