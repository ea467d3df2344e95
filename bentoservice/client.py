"""A Python client in OpenWeights' style, over the official openai SDK.

client = bentoservice.Client("http://localhost:3000")
file = client.files.create(open("conversations.jsonl", "rb"), purpose="conversations")
job = client.fine_tuning.create(model="smollm2", training_file=file["id"], loss="sft", epochs=1)
client.events.latest(["loss", "learning_rate"], job_id=job["id"])
with client.deploy(job["outputs"]["model"]) as openai_client: ...
"""

from __future__ import annotations

import builtins
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import openai

FINAL = ("succeeded", "failed", "cancelled")


class Files:
    def __init__(self, client: openai.OpenAI) -> None:
        self._openai = client

    def create(self, file: IO[bytes] | bytes | str | Path, purpose: str = "conversations") -> dict[str, Any]:
        """Upload a file; purpose is fine-tune, conversations (SFT) or preference (DPO/ORPO)."""
        upload = Path(file) if isinstance(file, str) else file
        # The server takes purposes beyond those OpenAI's types list (conversations, preference).
        return self._openai.files.create(file=upload, purpose=purpose).model_dump()  # type: ignore[arg-type]

    def list(self) -> list[dict[str, Any]]:
        return [f.model_dump() for f in self._openai.files.list().data]


class FineTuning:
    def __init__(self, client: openai.OpenAI) -> None:
        self._openai = client

    def create(
        self,
        model: str,
        training_file: str,
        loss: str = "sft",
        epochs: int | None = None,
        learning_rate: float | None = None,
        beta: float | None = None,
        test_file: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Start a job. `options` takes OpenWeights' other names (r, lora_alpha, max_seq_length,
        merge_before_push, per_device_train_batch_size, ...)."""
        body = {
            "loss": loss,
            "epochs": epochs,
            "learning_rate": learning_rate,
            "beta": beta,
            "test_file": test_file,
            **options,
        }
        job = self._openai.fine_tuning.jobs.create(
            model=model, training_file=training_file, extra_body={k: v for k, v in body.items() if v is not None}
        )
        return job.model_dump()

    def retrieve(self, job_id: str) -> dict[str, Any]:
        return self._openai.fine_tuning.jobs.retrieve(job_id).model_dump()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._openai.fine_tuning.jobs.cancel(job_id).model_dump()

    def follow(self, job_id: str, poll: float = 1.0) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """The job and its events since the last look (oldest first), every `poll` seconds until it succeeds,
        fails or is cancelled."""
        seen: set[str] = set()
        while True:
            job = self.retrieve(job_id)  # before the events, so that the last look sees every event of an ended job
            page = self._openai.fine_tuning.jobs.list_events(job_id, limit=100).data
            new = [e.model_dump() for e in reversed(page) if e.id not in seen]
            seen.update(e["id"] for e in new)
            yield job, new
            if job["status"] in FINAL:
                return
            time.sleep(poll)

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 1.0, progress: bool = True) -> dict[str, Any]:
        """Wait until the job succeeds, fails or is cancelled, showing its steps, loss and ETA as a tqdm bar
        (a widget in a notebook) unless `progress` is False."""
        from bentoservice.training.jobs.view import StepBar

        deadline = time.monotonic() + timeout
        bar = StepBar(job_id, disable=not progress)
        try:
            for job, events in self.follow(job_id, poll):
                bar.update(events)
                if job["status"] not in FINAL and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
        finally:
            bar.close()
        return job

    def show(self, job_id: str) -> None:
        """Print the job: status, result files and its before/after evaluation as tables."""
        from bentoservice.training.jobs.view import print_job

        print_job(self.retrieve(job_id))


class Events:
    def __init__(self, client: openai.OpenAI) -> None:
        self._openai = client

    def list(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of a job, oldest first; metrics are in each event's `data`."""
        pages = self._openai.fine_tuning.jobs.list_events(job_id, limit=1000)
        return [e.model_dump() for e in reversed(list(pages))]  # iterating a page fetches the rest

    def latest(self, keys: builtins.list[str], job_id: str) -> dict[str, Any]:
        """The newest value of each metric named in `keys`."""
        found: dict[str, Any] = {}
        for event in reversed(self.list(job_id)):
            for key in keys:
                if key not in found and key in (event.get("data") or {}):
                    found[key] = event["data"][key]
        return found


class Client:
    def __init__(self, base_url: str = "http://localhost:3000", api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key or os.environ.get("BENTOSERVICE_API_KEY") or "none"
        self.openai = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key)
        self.files = Files(self.openai)
        self.fine_tuning = FineTuning(self.openai)
        self.events = Events(self.openai)

    def _post(self, base_url: str, path: str, body: dict[str, Any]) -> None:
        response = httpx.post(
            f"{base_url}/v1{path}", json=body, timeout=120, headers={"authorization": f"Bearer {self.api_key}"}
        )
        if response.status_code >= 400:
            # openai's types name its own vendored httpx's Response; it only stores the response it is given.
            raise openai.BadRequestError(
                response.json()["error"]["message"],
                response=response,  # type: ignore[arg-type]
                body=response.json()["error"],
            )

    @contextmanager
    def deploy(self, model: str, lora_adapters: list[str] | tuple[str, ...] = ()) -> Iterator[openai.OpenAI]:
        """An openai client for `model` with `lora_adapters` loaded.

        This server serves the model when it is its base or a loaded adapter; any other model of the
        store (a merged fine-tune, say) gets a server of its own on a free local port, stopped on exit.
        Adapters that had to be loaded are unloaded on exit.
        """
        served = {m.id for m in self.openai.models.list().data}
        if model in served:
            with self._with_adapters(self.base_url, served, lora_adapters):
                yield self.openai
            return
        with _local_server(model) as url, self._with_adapters(url, set(), lora_adapters):
            yield openai.OpenAI(base_url=f"{url}/v1", api_key=self.api_key)

    @contextmanager
    def _with_adapters(self, base_url: str, served: set[str], adapters: list[str] | tuple[str, ...]) -> Iterator[None]:
        loaded = []
        try:
            for adapter in adapters:
                if adapter not in served:
                    self._post(base_url, "/adapters/load", {"adapter_id": adapter, "adapter_name": adapter})
                    loaded.append(adapter)
            yield
        finally:
            for adapter in loaded:
                self._post(base_url, "/adapters/unload", {"adapter_name": adapter})


@contextmanager
def _local_server(model: str, timeout: float = 300) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoservice.cli", "start", model, "--port", str(port), "--host", "127.0.0.1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"could not start a server for {model!r}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
