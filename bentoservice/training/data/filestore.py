"""Uploaded files and finished jobs' adapters, through fsspec: under data_dir/files by default, or under any fsspec
URL (BENTOSERVICE_FILES_URL: s3://bucket/prefix, gs://..., file:///shared/folder) that every replica and every
training node can reach. Torch-free: the HTTP layer, the queue and the runners use it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from bentoservice.config import get_settings

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def root() -> str:
    settings = get_settings()
    return (settings.files_url or str(settings.files_dir)).rstrip("/")


def file_url(file_id: str) -> str:
    return f"{root()}/{file_id}"


def result_url(job_id: str) -> str:
    """Where a job that trained away from this model store leaves its adapter (a BentoML model archive)."""
    return f"{root()}/results/{job_id}.bentomodel"


def make_parent(url: str) -> None:
    """Create the folder `url` goes in (object stores have none to create)."""
    fs, path = fsspec.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def write(file_id: str, data: bytes) -> None:
    url = file_url(file_id)
    make_parent(url)
    with fsspec.open(url, "wb") as out:
        out.write(data)


def exists(url: str) -> bool:
    fs, path = fsspec.url_to_fs(url)
    return fs.isfile(path)


def chunks(url: str) -> Iterator[bytes]:
    with fsspec.open(url, "rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def delete(url: str) -> None:
    fs, path = fsspec.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def local_path(url: str, folder: Path) -> Path:
    """A local path to read `url` from: the file itself when it is local, else a copy made under `folder`."""
    fs, path = fsspec.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / Path(path).name
    # Each worker of a distributed job copies on its own and renames at once: none reads another's half-written copy.
    partial = copy.with_name(f"{copy.name}.{os.getpid()}.part")
    with fs.open(path, "rb") as source, open(partial, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    os.replace(partial, copy)
    log.info("copied %s to %s", url, copy)
    return copy
