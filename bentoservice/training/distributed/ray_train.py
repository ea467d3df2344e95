"""A job on a Ray cluster: `python -m bentoservice.training.distributed.ray_train JOB_ID`, the entry point that
training.distributed.backends submits through Ray's Jobs API.

It runs the job's runner in `num_workers` Ray Train workers (TorchTrainer: one torch process group, gloo between CPU
workers, NCCL between GPUs), where the HF Trainer trains data-parallel exactly as under `accelerate launch`. The
runner's rank 0 writes events, checkpoints and the outcome into the job store, as on the local backend.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from bentoservice.config import get_settings
from bentoservice.training.distributed.backends import scale_of
from bentoservice.training.jobs.store import JobStore

log = logging.getLogger("bentoservice.ray_train")


def _worker(config: dict[str, Any]) -> None:
    from bentoservice.training.jobs.runner import run

    if run(config["job_id"]) != 0:
        raise RuntimeError(f"the runner of job {config['job_id']} failed; its reason is in the job's events")


def main(job_id: str) -> int:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = JobStore().get_job(job_id)
    if job is None:
        log.error("no job %s in the job store", job_id)
        return 1
    scale = scale_of(job["config"])
    gpus = scale.gpus_per_worker or 0
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job_id": job_id},
        scaling_config=ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})},
        ),
        # The job store's attempts (and resuming from checkpoints) handle retries, not Ray.
        run_config=RunConfig(
            name=job_id,
            storage_path=str(get_settings().jobs_dir / job_id / "ray"),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(main(sys.argv[1]))
