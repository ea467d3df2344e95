"""One fine-tuning job in its own OS process: `python -m bentoservice.training.jobs.runner JOB_ID`.

It reads the job from the job store, trains (resuming from the job's newest checkpoint when there is
one), writes events and checkpoints as it goes, and records the outcome. In a distributed run (see
training.backends) every worker runs this; only rank 0 writes events and the outcome. The serving process never
trains; it only launches, watches and cancels these processes, and marks a job succeeded once its
result is served (see training.queue).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from bentoservice.config import get_settings
from bentoservice.training.data import filestore
from bentoservice.training.distributed.backends import rank
from bentoservice.training.jobs.store import JobStore, now

if TYPE_CHECKING:
    from bentoservice.training.config import TrainingConfig
    from bentoservice.training.methods.encoder_config import EncoderConfig
    from bentoservice.training.methods.trainers import TrainingResult

log = logging.getLogger("bentoservice.runner")


def _message(event: dict[str, Any], total: int | None) -> str:
    step = f"Step {event['step']}/{total}" if total else f"Step {event['step']}"
    if "loss" in event:
        return f"{step}: training loss={event['loss']:.4f}"
    if "eval_loss" in event:
        return f"{step}: validation loss={event['eval_loss']:.4f}"
    return step


class JobSink:
    """Progress events of one job, written to the job store."""

    def __init__(self, jobs: JobStore, job_id: str, total_steps: int | None) -> None:
        self.jobs, self.job_id, self.total = jobs, job_id, total_steps

    def __call__(self, event: dict[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k != "type"}
        if event["type"] == "checkpoint":
            self.jobs.add_checkpoint(self.job_id, event["step"], event["path"], event.get("metrics") or {})
            self.jobs.add_event(self.job_id, f"Checkpoint saved at step {event['step']}", type="checkpoint",
                                data=data)
        else:
            self.jobs.add_event(self.job_id, _message(event, self.total), type="metrics", data=data)


def _fail(jobs: JobStore, job_id: str, code: str, message: str) -> None:
    log.error("job %s failed: %s", job_id, message)
    if jobs.update_job(job_id, only_if=("running",), status="failed", finished_at=now(),
                       error={"code": code, "message": message, "param": None}):
        jobs.add_event(job_id, f"Fine-tuning failed: {message}", level="error")


def _local_files(options: dict[str, Any], job_id: str) -> dict[str, str]:
    """The job's files from the file store as local paths (copied under the job's folder when remote)."""
    folder = get_settings().jobs_dir / job_id / "files"
    return {key: str(filestore.local_path(options[key], folder)) for key in ("train_file", "test_file")
            if options.get(key)}


def _export(tag: str, job_id: str) -> None:
    """With a shared file store, leave the model there too: the server's model store may not be this one."""
    import bentoml

    url = filestore.result_url(job_id)
    filestore.make_parent(url)
    bentoml.models.export_model(tag, url)


def _train(config: TrainingConfig | EncoderConfig, sink: JobSink | None) -> TrainingResult:
    """The method's training (torch and the trainers imported only here)."""
    from bentoservice.training.methods.encoder_config import EncoderConfig

    if isinstance(config, EncoderConfig):
        from bentoservice.training.methods.encoders import run_encoder_training

        return run_encoder_training(config, sink=sink, resume=True)
    from bentoservice.training.methods.trainers import run_training

    return run_training(config, sink=sink, resume=True)


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
    main = rank() == 0
    try:
        options.update(_local_files(options, job_id))
        if options.get("method") in ENCODER_METHODS:
            config: TrainingConfig | EncoderConfig = EncoderConfig(**options)
        else:
            config = TrainingConfig(**options)
        if main:
            jobs.add_event(job_id, "Fine-tuning job started" if job["attempts"] <= 1 else
                           f"Fine-tuning job resumed (attempt {job['attempts']})")
        sink = JobSink(jobs, job_id, config.args.get("max_steps")) if main else None
        result = _train(config, sink)
        if not main:
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
    # The queue in the serving process marks the job succeeded once the model is served.
    if jobs.update_job(job_id, only_if=("running",), fine_tuned_model=model, store_tag=tag,
                       trained_tokens=int(tokens) if tokens else None):
        jobs.add_event(job_id, "Training completed", data={"store_tag": tag, "metrics": result.metrics})
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(run(sys.argv[1]))


if __name__ == "__main__":
    main()
