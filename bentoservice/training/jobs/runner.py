"""One fine-tuning job in its own OS process: `python -m bentoservice.training.jobs.runner JOB_ID`.

It reads the job from the job store, trains (resuming from the job's newest checkpoint when there is
one), writes events and checkpoints as it goes, and records the outcome. In a distributed run (see
training.backends) every worker runs this; only rank 0 writes events and the outcome. The serving process never
trains; it only launches, watches and cancels these processes, and marks a job succeeded once its
result is served (see training.queue).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bentoservice.config import get_settings
from bentoservice.training.data import filestore
from bentoservice.training.distributed.backends import rank
from bentoservice.training.jobs import results
from bentoservice.training.jobs.store import JobStore, new_id, now

if TYPE_CHECKING:
    from bentoservice.training.config import TrainingConfig
    from bentoservice.training.methods.encoder_config import EncoderConfig
    from bentoservice.training.methods.runs import TrainingResult

log = logging.getLogger("bentoservice.runner")


def _message(event: dict[str, Any]) -> str:
    total = event.get("total_steps")
    step = f"Step {event['step']}/{total}" if total else f"Step {event['step']}"
    if "reward" in event:
        return f"{step}: training reward={event['reward']:.4f}"
    if "eval_reward" in event:
        return f"{step}: validation reward={event['eval_reward']:.4f}"
    if "loss" in event:
        return f"{step}: training loss={event['loss']:.4f}"
    if "eval_loss" in event:
        return f"{step}: validation loss={event['eval_loss']:.4f}"
    return step


class JobSink:
    """Progress events of one job, written to the job store with OpenAI's metric names beside the trainer's."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self.jobs, self.job_id = jobs, job_id

    def __call__(self, event: dict[str, Any]) -> None:
        data = results.with_openai_names({k: v for k, v in event.items() if k != "type"})
        if event["type"] == "checkpoint":
            metrics = {"step": event["step"], **results.with_openai_names(event.get("metrics") or {})}
            self.jobs.add_checkpoint(self.job_id, event["step"], event["path"], metrics)
            self.jobs.add_event(
                self.job_id,
                f"Checkpoint saved at step {event['step']}",
                type="checkpoint",
                data={**data, "metrics": metrics},
            )
            return
        self.jobs.add_event(self.job_id, _message(event), type="metrics", data=data)
        if "eta_seconds" in event:
            self.jobs.update_job(
                self.job_id, only_if=("running",), estimated_finish=now() + round(event["eta_seconds"])
            )


class PauseFlag:
    """Set once the job's pause is requested; reads the job store at most once a second (it is asked every step)."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self.jobs, self.job_id, self._next, self._set = jobs, job_id, 0.0, False

    def is_set(self) -> bool:
        if not self._set and time.monotonic() >= self._next:
            self._next = time.monotonic() + 1
            self._set = bool((self.jobs.get_job(self.job_id) or {}).get("pause_requested"))
        return self._set


def _store_result(jobs: JobStore, filename: str, data: bytes, rows: int) -> str:
    """A result of the job stored as a file of purpose fine-tune-results; its id."""
    file_id = new_id("file")
    filestore.write(file_id, data)
    jobs.add_file(
        id=file_id,
        filename=filename,
        purpose="fine-tune-results",
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format=filename.rsplit(".", 1)[-1],
        kind="results",
        rows=rows,
    )
    return file_id


def _result_files(jobs: JobStore, job_id: str, evaluation: dict[str, Any] | None) -> list[str]:
    """OpenAI's step_metrics.csv of the job's metrics events, and the before/after evaluation when there is one."""
    rows, _ = jobs.list_events(job_id, limit=1_000_000)
    csv, count = results.step_metrics_csv(r["data"] for r in reversed(rows) if r["type"] == "metrics" and r["data"])
    files = [_store_result(jobs, "step_metrics.csv", csv, count)]
    if evaluation is not None:
        files.append(
            _store_result(
                jobs, "evaluation.json", json.dumps(evaluation, indent=1).encode(), len(evaluation["samples"])
            )
        )
    return files


# The method's own held-out figure, beside the loss: DPO's and ORPO's preference accuracy, a rerank's MRR.
METHOD_FIGURES = ("preference_accuracy", "mrr", "accuracy")


def _evaluation_message(evaluation: dict[str, Any]) -> str:
    base, adapter = evaluation.get("base") or {}, evaluation.get("adapter") or {}
    compared = f"{len(evaluation['samples'])} samples of the base and the fine-tuned model compared"
    if "loss" not in base or "loss" not in adapter:
        return f"Evaluation: {compared}"
    figures = "".join(
        f", {name} {base[name]:.4f} -> {adapter[name]:.4f}"
        for name in METHOD_FIGURES
        if name in base and name in adapter
    )
    loss = f"held-out loss {base['loss']:.4f} (base) -> {adapter['loss']:.4f} (fine-tuned)"
    return f"Evaluation: {loss}{figures}; {compared}"


def _wandb_environment(wandb: dict[str, Any]) -> None:
    """wandb's settings for TRL's WandbCallback: one run per job (a resumed job goes on logging into it), offline
    unless the server's environment sets WANDB_MODE."""
    Path(wandb["dir"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.update(
        WANDB_PROJECT=wandb["project"], WANDB_DIR=wandb["dir"], WANDB_RUN_ID=wandb["run_id"], WANDB_RESUME="allow"
    )
    if wandb.get("entity"):
        os.environ["WANDB_ENTITY"] = wandb["entity"]
    if wandb.get("tags"):
        os.environ["WANDB_TAGS"] = ",".join(wandb["tags"])


def _fail(jobs: JobStore, job_id: str, code: str, message: str) -> None:
    log.error("job %s failed: %s", job_id, message)
    if jobs.update_job(
        job_id,
        only_if=("running",),
        status="failed",
        finished_at=now(),
        error={"code": code, "message": message, "param": None},
    ):
        jobs.add_event(job_id, f"Fine-tuning failed: {message}", level="error")


def _local_files(options: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The job's files from the file store as local paths (copied under the job's folder when remote)."""
    folder = get_settings().jobs_dir / job_id / "files"
    local: dict[str, Any] = {
        key: str(filestore.local_path(options[key], folder)) for key in ("train_file", "test_file") if options.get(key)
    }
    if (options.get("evaluation") or {}).get("prompts_file"):
        prompts = filestore.local_path(options["evaluation"]["prompts_file"], folder)
        local["evaluation"] = {**options["evaluation"], "prompts_file": str(prompts)}
    return local


def _export(tag: str, job_id: str) -> None:
    """With a shared file store, leave the model there too: the server's model store may not be this one."""
    import bentoml

    url = filestore.result_url(job_id)
    filestore.make_parent(url)
    bentoml.models.export_model(tag, url)


def _train(config: TrainingConfig | EncoderConfig, sink: JobSink | None, stop: PauseFlag) -> TrainingResult:
    """The method's training (torch and the trainers imported only here)."""
    from bentoservice.training.methods.encoder_config import EncoderConfig

    if isinstance(config, EncoderConfig):
        from bentoservice.training.methods.encoders import run_encoder_training

        return run_encoder_training(config, sink=sink, stop=stop, resume=True)
    if config.method == "grpo":
        from bentoservice.training.methods.rl import run_reinforcement

        return run_reinforcement(config, sink=sink, stop=stop, resume=True)
    from bentoservice.training.methods.trainers import run_training

    return run_training(config, sink=sink, stop=stop, resume=True)


def run(job_id: str) -> int:
    from pydantic import ValidationError

    from bentoservice.store import StoreError
    from bentoservice.training.config import TrainingConfig, TrainingError
    from bentoservice.training.data.formats import DataFormatError
    from bentoservice.training.methods.encoder_config import ENCODER_METHODS, EncoderConfig

    jobs = JobStore()
    job = jobs.get_job(job_id)
    if job is None or job["status"] != "running":
        log.error("job %s is not running", job_id)
        return 1
    options = dict(job["config"])
    merge = options.pop("merge_before_push", False)
    options.pop("scale", None)  # how the job is spread over processes: the launcher's business
    wandb, trackio = options.pop("wandb", None), options.pop("trackio", None)
    if wandb:
        _wandb_environment(wandb)
    if trackio:
        Path(trackio["dir"]).mkdir(parents=True, exist_ok=True)
        os.environ["TRACKIO_DIR"] = trackio["dir"]  # read when trackio is imported, by TRL's callback
    main = rank() == 0
    try:
        options.update(_local_files(options, job_id))
        if options.get("method") in ENCODER_METHODS:
            config: TrainingConfig | EncoderConfig = EncoderConfig(**options)
        else:
            config = TrainingConfig(**options)
        checkpoints = jobs.list_checkpoints(job_id)
        if main:
            jobs.add_event(
                job_id,
                f"Fine-tuning job resumed from step {checkpoints[0]['step']} (attempt {job['attempts']})"
                if checkpoints
                else "Fine-tuning job started",
            )
        sink = JobSink(jobs, job_id) if main else None
        result = _train(config, sink, PauseFlag(jobs, job_id))
        if not main:
            return 0
        if result.stopped:
            _paused(jobs, job_id)
            return 0
        model, tag = job["fine_tuned_model"], result.tag
        if merge:
            from bentoservice.training.methods.merge import merge_adapter

            assert config.adapter_name is not None  # every job's config names its adapter (api.fine_tuning.dialects)
            tag = str(merge_adapter(config.model, str(result.tag), config.adapter_name + "-merged").tag)
            model = tag.split(":")[0]
        if get_settings().files_url:
            _export(str(tag), job_id)
    except (DataFormatError, TrainingError, StoreError, ValidationError, ValueError) as exc:
        _fail(jobs, job_id, "invalid_training_job", str(exc).splitlines()[0])
        return 1
    except Exception as exc:  # anything else fails the job with its reason, not silently
        log.exception("job %s crashed", job_id)
        _fail(jobs, job_id, "training_failed", f"{exc.__class__.__name__}: {exc}")
        return 1
    tokens = result.metrics.get("num_input_tokens_seen")
    full = results.full_validation(result.metrics)
    if full:
        step = max((c["step"] for c in jobs.list_checkpoints(job_id)), default=0)
        reward = "full_valid_reward_mean" in full
        name, key = ("reward", "full_valid_reward_mean") if reward else ("loss", "full_valid_loss")
        jobs.add_event(job_id, f"Full validation {name}={full[key]:.4f}", type="metrics", data={"step": step, **full})
    # The queue in the serving process marks the job succeeded once the model is served.
    if wandb and (runs := sorted(Path(wandb["dir"]).glob(f"wandb/*run-*-{wandb['run_id']}"))):
        jobs.add_event(job_id, f"Weights & Biases run written to {runs[-1]}", data={"wandb_run_dir": str(runs[-1])})
    if trackio:
        jobs.add_event(
            job_id,
            f"Trackio run written to {trackio['dir']} (`TRACKIO_DIR={trackio['dir']} trackio show`)",
            data={"trackio_dir": trackio["dir"]},
        )
    if result.evaluation is not None:
        jobs.add_event(job_id, _evaluation_message(result.evaluation), data={"evaluation": result.evaluation})
    if jobs.update_job(
        job_id,
        only_if=("running",),
        fine_tuned_model=model,
        store_tag=tag,
        trained_tokens=int(tokens) if tokens else None,
        evaluation=result.evaluation,
        result_files=_result_files(jobs, job_id, result.evaluation),
    ):
        jobs.add_event(job_id, "Training completed", data={"store_tag": tag, "metrics": result.metrics})
    return 0


def _paused(jobs: JobStore, job_id: str) -> None:
    """The run stopped at a pause request after saving a checkpoint: the job waits, its runner exits."""
    newest = jobs.list_checkpoints(job_id)
    step = newest[0]["step"] if newest else 0
    if jobs.update_job(job_id, only_if=("running",), status="paused", pid=None, estimated_finish=None):
        jobs.add_event(job_id, f"Fine-tuning job paused at step {step}", data={"step": step})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(run(sys.argv[1]))


if __name__ == "__main__":
    main()
