"""Issue 18: stopping and killing the server. SIGTERM to the main process, and SIGTERM or SIGINT (a Ctrl-C) to its
process group, stop every process of the server, the training runner included, and the job resumes at the next
start; kill -9 during an upload and as a finished job's adapter is handed to serving loses nothing that was
accepted. (kill -9 mid-training: test_fine_tuning.py's test_restart_mid_job_resumes.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import Server
from test_fine_tuning import CHATS, _job_row, jsonl, training_past_a_checkpoint, wait_for


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


# (how the server is stopped, whether the test restarts it to see the job resume): SIGINT to the group is a Ctrl-C
# in the terminal that runs `bentoservice start`. Every stop leaves the job queued with no runner, which is what the
# next start resumes; one variant restarts to show it (a restart and the rest of the job cost a minute).
STOPS = [
    ("SIGTERM to the main process", signal.SIGTERM, False, True),
    ("SIGTERM to the process group", signal.SIGTERM, True, False),
    ("SIGINT to the process group", signal.SIGINT, True, False),
]


@pytest.mark.parametrize(("signum", "group", "restart"), [s[1:] for s in STOPS], ids=[s[0] for s in STOPS])
def test_a_stop_leaves_no_process_and_the_job_resumes(
    tiny, tmp_path: Path, signum: signal.Signals, group: bool, restart: bool
) -> None:
    env = {"BENTOSERVICE_DATA_DIR": str(tmp_path)}
    server = Server("tiny", env=env)
    try:
        client = server.client()
        uploaded, job = training_past_a_checkpoint(client)
        runner = psutil.Process(_job_row(tmp_path, job.id)["pid"])
        pids = {p.pid for p in (*server._tree(), runner, *runner.children(recursive=True))}
        if group:
            os.killpg(server.proc.pid, signum)  # the server was started in a session (and group) of its own
        else:
            server.proc.send_signal(signum)
        server.proc.wait(60)
        deadline = time.monotonic() + 15
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pids), [psutil.Process(p).cmdline() for p in _alive(pids)]
        row = _job_row(tmp_path, job.id)
        assert row["status"] == "queued" and row["pid"] is None, row
    finally:
        server.stop()
    if not restart:
        return
    server = Server("tiny", env=env)
    try:
        client = server.client()
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data]
        assert any("server stopped" in m for m in messages) and any("resumed from step" in m for m in messages)
        assert client.files.content(uploaded.id).content == jsonl(CHATS)
    finally:
        server.stop()


def _slow_body(sent: threading.Event) -> Iterator[bytes]:
    yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
    sent.set()
    for _ in range(600):  # the server is killed long before this ends
        yield jsonl(CHATS) + b"\n"
        time.sleep(0.1)


def test_kill_9_during_an_upload_and_a_hand_off_loses_nothing_accepted(tiny, tmp_path: Path) -> None:
    env = {"BENTOSERVICE_DATA_DIR": str(tmp_path)}
    server = Server("tiny", env=env)
    try:
        client = server.client()
        kept = client.files.create(file=("kept.jsonl", jsonl(CHATS)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=kept.id, extra_body={"max_steps": 3})
        sent, outcome = threading.Event(), []

        def upload() -> None:
            try:
                outcome.append(
                    httpx.post(
                        f"{server.url}/v1/files",
                        content=_slow_body(sent),
                        headers={"Content-Type": "multipart/form-data; boundary=b"},
                        timeout=120,
                    )
                )
            except httpx.HTTPError as exc:
                outcome.append(exc)

        uploading = threading.Thread(target=upload)
        uploading.start()
        assert sent.wait(30)
        # The runner records its adapter, then the queue hands it to serving: kill everything at that moment.
        deadline = time.monotonic() + 240
        while not _job_row(tmp_path, job.id)["store_tag"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _job_row(tmp_path, job.id)["store_tag"], _job_row(tmp_path, job.id)
        server.crash()
        uploading.join(30)
        assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome  # the cut upload was never accepted
    finally:
        server.stop()
    server = Server("tiny", env=env)
    try:
        client = server.client()
        assert [f.id for f in client.files.list(purpose="fine-tune").data] == [kept.id]
        assert client.files.content(kept.id).content == jsonl(CHATS)
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        reply = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == done.fine_tuned_model
    finally:
        server.stop()
