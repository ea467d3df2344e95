"""Where a fine-tuning job trains: `local` (processes on this machine) or `ray` (a Ray cluster, via its Jobs API).

Every training process runs `bentoservice.training.jobs.runner`, whose main process (rank 0) writes events, checkpoints
and the outcome into the job store itself; the queue (training.queue) only launches, watches and cancels, through
a Handle.

- local, one worker: `python -m bentoservice.training.jobs.runner JOB_ID` in a session of its own.
- local, N workers: the same under `accelerate launch --multi_gpu --num_processes N`: data parallel over N processes
  (one GPU each, or gloo over CPU processes when there is no GPU or gpus_per_worker is 0).
- ray: a Ray job whose entry point (training.ray_train) runs the runner in N Ray Train workers (TorchTrainer). The
  job gets this server's database URL and file store URL: with SQLite and local files only a Ray head on this
  machine can use them, so a remote cluster needs BENTOSERVICE_DATABASE_URL and BENTOSERVICE_FILES_URL that both
  sides reach. Its adapter comes back as a BentoML model archive in the file store (see fetch_result).

Torch-free; Ray is imported only for ray jobs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field

from bentoservice.config import get_settings
from bentoservice.training.data import filestore

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

KILL_GRACE = 5.0
SUBMIT_TRIES = 10
RAY_FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HOST = socket.gethostname()

# TrainingArguments for each way of spreading a job over its workers: DDP is the Trainer's default under a process
# group; FSDP2 shards parameters, gradients and optimizer state; DeepSpeed ZeRO-2 shards optimizer state and gradients
# ("auto" takes the Trainer's own values). Both shard over GPUs: accelerate runs CPU processes as plain DDP.
DISTRIBUTED_ARGS: dict[str, dict[str, Any]] = {
    "ddp": {"ddp_find_unused_parameters": False},  # every LoRA weight takes part: skip DDP's search for unused ones
    "fsdp": {"fsdp": True, "fsdp_config": {"version": 2}},  # full shard, wrapped by decoder layer
    "deepspeed": {
        "deepspeed": {
            "zero_optimization": {"stage": 2},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
        }
    },
}


class BackendError(ValueError):
    """A job that this server cannot train as asked; `param` names the body field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Scale(BaseModel):
    """How a job is spread: the `backend`, `num_workers`, `gpus_per_worker` and `distributed` fields of its body."""

    backend: Literal["local", "ray"] = Field(default_factory=lambda: get_settings().training_backend)
    num_workers: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0)
    """None: locally, a GPU per process when there are GPUs; on Ray, none."""
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"


def check(scale: Scale) -> Scale:
    """Refuse at once what cannot run (raises BackendError)."""
    settings = get_settings()
    if scale.distributed != "ddp" and scale.gpus_per_worker == 0:
        raise BackendError(
            f"distributed={scale.distributed} shards the model over GPUs; CPU workers train with ddp", "distributed"
        )
    if scale.backend == "ray":
        if not settings.ray_address:
            raise BackendError(
                "no Ray cluster is configured: set BENTOSERVICE_RAY_ADDRESS to its dashboard "
                "address (e.g. http://head:8265)",
                "backend",
            )
        if importlib.util.find_spec("ray") is None:
            raise BackendError("the ray backend needs Ray on this server: pip install 'bentoservice[ray]'", "backend")
    elif scale.gpus_per_worker not in (None, 0, 1):
        raise BackendError(
            "a local worker process trains on at most one GPU; use num_workers for more GPUs", "gpus_per_worker"
        )
    elif scale.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise BackendError("distributed=deepspeed needs the deepspeed package on this server", "distributed")
    return scale


def scale_of(config: dict[str, Any]) -> Scale:
    """The scale a job was created with (jobs from before scaling existed are local, one worker)."""
    return Scale(**config.get("scale") or {"backend": "local"})


def rank() -> int:
    """This process's rank in a distributed run (RANK is set by torchrun, accelerate and Ray Train); 0 alone."""
    return int(os.environ.get("RANK", "0"))


# --- handles ---------------------------------------------------------------------------------


class Handle(Protocol):
    @property
    def pid(self) -> int | None: ...

    def finished(self) -> bool: ...

    def kill(self) -> None: ...

    def exit_note(self) -> str | None: ...


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class LocalRun:
    """A runner process group on this machine (the runner, or accelerate's launcher and its workers)."""

    job_id: str
    pid: int
    process: subprocess.Popen | None = None  # None when adopted from an earlier server
    kill_sent: float | None = None

    def finished(self) -> bool:
        if self.process is not None:
            return self.process.poll() is not None
        return not _alive(self.pid)

    def kill(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        sig = signal.SIGTERM if self.kill_sent is None else signal.SIGKILL
        if self.kill_sent is None or time.monotonic() - self.kill_sent > KILL_GRACE:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            self.kill_sent = self.kill_sent or time.monotonic()

    def stop(self) -> None:
        """Kill the group and wait for it: SIGTERM, SIGKILL after KILL_GRACE (the server is stopping)."""
        self.kill()
        deadline = time.monotonic() + KILL_GRACE
        while not self.finished() and time.monotonic() < deadline:
            time.sleep(0.1)
        try:  # whatever of the group is left (accelerate's workers outlive their launcher)
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process is not None:
            self.process.wait()

    def exit_note(self) -> str | None:
        return None


@lru_cache
def ray_client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


@dataclass
class RayRun:
    """A job on a Ray cluster, known by its submission id."""

    job_id: str
    submission_id: str
    address: str
    pid: int | None = None
    stop_sent: bool = False
    status: str | None = None

    def finished(self) -> bool:
        try:
            self.status = str(ray_client(self.address).get_job_status(self.submission_id).value)
        except Exception as exc:  # an unreachable head is not a finished job: ask again next time
            log.warning("no status for Ray job %s: %s", self.submission_id, exc)
            return False
        return self.status in RAY_FINAL

    def kill(self) -> None:
        if not self.stop_sent:
            ray_client(self.address).stop_job(self.submission_id)
            self.stop_sent = True

    def exit_note(self) -> str | None:
        if self.status != "FAILED":
            return None
        info = ray_client(self.address).get_job_info(self.submission_id)
        logs = ray_client(self.address).get_job_logs(self.submission_id).strip().splitlines()[-5:]
        return f"The Ray job {self.submission_id} failed: {info.message}" + "".join(f"\n{line}" for line in logs)


# --- launching and adopting ------------------------------------------------------------------


def launch(job: dict[str, Any]) -> tuple[Handle, dict[str, Any]]:
    """Start a job's training; returns its handle and the fields to record on the job (pid, host)."""
    scale = scale_of(job["config"])
    if scale.backend == "ray":
        submitted = _submit(job)
        return submitted, {"pid": None, "host": f"ray:{submitted.submission_id}"}
    spawned = _spawn(job["id"], scale)
    return spawned, {"pid": spawned.pid, "host": HOST}


def adopt(job: dict[str, Any]) -> Handle | None:
    """The handle of a running job whose training outlived an earlier server; None when it is gone."""
    host = job.get("host") or HOST
    if host.startswith("ray:"):
        address = get_settings().ray_address
        run = RayRun(job["id"], host.removeprefix("ray:"), address) if address else None
        return None if run is None or run.finished() else run
    return LocalRun(job["id"], job["pid"]) if job["pid"] and _alive(job["pid"]) else None


def launched_here(job: dict[str, Any]) -> bool:
    """Whether this server watches the job: Ray jobs anywhere; local ones only on the host that runs them (with a
    shared database, replicas on other hosts leave each other's local jobs alone)."""
    host = job.get("host") or HOST
    return host.startswith("ray:") or host == HOST


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(job_id: str, scale: Scale) -> LocalRun:
    folder = get_settings().jobs_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    launcher = (
        []
        if scale.num_workers == 1
        else [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(scale.num_workers),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
    )
    command = [sys.executable, *launcher, "-m", "bentoservice.training.jobs.runner", job_id]
    env = dict(os.environ)
    if scale.gpus_per_worker == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(folder / "runner.log", "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    return LocalRun(job_id, process.pid, process)


def _ray_address() -> str:
    address = get_settings().ray_address
    if not address:
        raise BackendError("no Ray cluster is configured (BENTOSERVICE_RAY_ADDRESS)", "backend")
    return address


def _submit(job: dict[str, Any]) -> RayRun:
    from bentoservice.training.jobs.store import database

    settings = get_settings()
    address = _ray_address()
    runtime_env = dict(settings.ray_runtime_env)
    runtime_env["env_vars"] = {
        "BENTOSERVICE_DATABASE_URL": database().url.render_as_string(hide_password=False),
        "BENTOSERVICE_FILES_URL": filestore.root(),
        **runtime_env.get("env_vars", {}),
    }
    submission_id = f"bentoservice-{job['id']}-{job['attempts']}"
    for attempt in range(SUBMIT_TRIES):
        try:
            ray_client(address).submit_job(
                entrypoint=f"python -m bentoservice.training.distributed.ray_train {job['id']}",
                submission_id=submission_id,
                runtime_env=runtime_env,
            )
            break
        except RuntimeError as exc:
            # A head that has just started answers "No available agent to submit job, please try again later".
            if "try again later" not in str(exc) or attempt == SUBMIT_TRIES - 1:
                raise
            time.sleep(2)
    log.info("submitted job %s to Ray at %s as %s", job["id"], address, submission_id)
    return RayRun(job["id"], submission_id, address)


def fetch_result(job: dict[str, Any]) -> None:
    """Put a job's trained model into this server's model store when it was trained into another one (a Ray node's,
    another replica's): from the archive the runner left in the file store."""
    import bentoml

    try:
        bentoml.models.get(job["store_tag"])
        return
    except bentoml.exceptions.NotFound:
        pass
    url = filestore.result_url(job["id"])
    if not filestore.exists(url):
        raise FileNotFoundError(f"{job['store_tag']} is neither in this model store nor at {url}")
    bentoml.models.import_model(url)
    log.info("imported %s of job %s from %s", job["store_tag"], job["id"], url)
