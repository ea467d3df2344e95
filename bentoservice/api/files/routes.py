"""Files, as OpenAI's API has them: upload (checked at once), list, retrieve, content, delete.

A file is stored under its id with its sha256, in the file store (training.filestore: a local folder or any
fsspec URL); the uploaded name is kept as data, never used as a path.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from bentoservice.api.errors import APIError
from bentoservice.api.responses import File, FileDeleted, listing, ok
from bentoservice.config import get_settings
from bentoservice.training.data import filestore, formats
from bentoservice.training.jobs.store import JobStore

router = APIRouter()

# OpenWeights' purposes say what the file holds; OpenAI's "fine-tune" lets the content say.
PURPOSES: dict[str, formats.Kind | None] = {"fine-tune": None, "conversations": "sft", "preference": "preference"}


def job_store(request: Request) -> JobStore:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise APIError(503, "the fine-tuning service is not ready", None, "service_loading")
    return jobs


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "format": row["format"],
        "rows": row["rows"],
    }


def _get(jobs: JobStore, file_id: str) -> dict[str, Any]:
    row = jobs.get_file(file_id)
    if row is None:
        raise APIError(404, f"No such File object: {file_id}", "id", "file_not_found")
    return row


def safe_filename(name: str | None) -> str:
    """The last part of an uploaded name, without control characters or leading dots (`../../x` becomes `x`)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).lstrip(". ")[:255]
    return base or "upload"


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the file is larger than the limit of {limit} bytes", "file", "file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/files", responses=ok(File))
async def upload(request: Request, file: UploadFile, purpose: str = Form(...)) -> dict[str, Any]:
    jobs = job_store(request)
    if purpose not in PURPOSES:
        raise APIError(
            400, f"purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}", "purpose", "invalid_purpose"
        )
    settings = get_settings()
    data = await _read_limited(file, settings.max_file_bytes)
    name = safe_filename(file.filename)
    try:
        parsed = await run_in_threadpool(formats.parse_bytes, data, name, PURPOSES[purpose])
    except formats.DataFormatError as exc:
        raise APIError(400, f"{name}: {exc}", "file", "invalid_file_format") from None
    digest = hashlib.sha256(data).hexdigest()
    row = jobs.add_file(
        filename=name,
        purpose=purpose,
        bytes=len(data),
        sha256=digest,
        format=parsed.format,
        kind=parsed.kind,
        rows=len(parsed.rows),
    )
    await run_in_threadpool(filestore.write, row["id"], data)
    return file_object(row)


@router.get("/files", responses=ok(listing(File)))
async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    rows = job_store(request).list_files(purpose)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False}


@router.get("/files/{file_id}", responses=ok(File))
async def retrieve(file_id: str, request: Request) -> dict[str, Any]:
    return file_object(_get(job_store(request), file_id))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def content(file_id: str, request: Request) -> StreamingResponse:
    row = _get(job_store(request), file_id)
    return StreamingResponse(
        filestore.chunks(filestore.file_url(row["id"])),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row["bytes"]),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row['filename'])}",
        },
    )


@router.delete("/files/{file_id}", responses=ok(FileDeleted))
async def delete(file_id: str, request: Request) -> dict[str, Any]:
    jobs = job_store(request)
    row = _get(jobs, file_id)
    jobs.delete_file(row["id"])
    await run_in_threadpool(filestore.delete, filestore.file_url(row["id"]))
    return {"id": row["id"], "object": "file", "deleted": True}
