"""Fine-tuning jobs as the openai SDK calls them, plus OPEA's calls (the bodies: protocol.py; their dialects:
dialects.py)."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from huggingface_hub import constants as hub_constants
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from bentoservice import store
from bentoservice.api.errors import APIError, unknown_model
from bentoservice.api.files.routes import job_store
from bentoservice.api.fine_tuning import reinforcement
from bentoservice.api.fine_tuning.dialects import KIND, WANTED, default_learning_rate, job_config, training_method
from bentoservice.api.fine_tuning.protocol import JobRef, JobRequest
from bentoservice.api.responses import FineTuningJobCheckpoint, Job, JobEvent, listing, ok
from bentoservice.training.jobs.queue import request_cancel, request_pause, request_resume
from bentoservice.training.jobs.results import with_openai_names
from bentoservice.training.jobs.store import FINAL, JobStore, new_id
from bentoservice.training.methods import encoder_config

router = APIRouter()


def _file(jobs: JobStore, ref: str, param: str, kind: str) -> dict[str, Any]:
    row = jobs.find_file(ref)
    if row is None:
        raise APIError(400, f"invalid {param}: no uploaded file {ref!r}", param, "file_not_found")
    if row["kind"] != kind:
        raise APIError(
            400,
            f"invalid {param}: {ref} holds {row['kind']} data, but this job needs {WANTED[kind]}",
            param,
            "invalid_file_kind",
        )
    return row


def _base(model: str) -> store.StoredModel | store.Card:
    try:
        return store.resolve_base(model)
    except store.StoreError:
        card = store.card_for(model)
        if card is None or not card.source:
            raise unknown_model(model) from None
        return card


def _encoder_base(model: str) -> str:
    """The store name of an embedding or rerank model to fine-tune; a hub id not yet stored is imported by the
    job when the hub is reachable."""
    try:
        return store.resolve_encoder(model).name
    except store.StoreError:
        bundled = [name for name, (hub_id, *_) in store.BUNDLED_ENCODERS.items() if model in (name, hub_id)]
        if bundled:
            return bundled[0]
        if model.count("/") == 1 and not model.startswith((".", "/", "~")) and not hub_constants.HF_HUB_OFFLINE:
            return model
        raise APIError(
            404,
            f"The model `{model}` does not exist: it is not in the model store and the Hugging "
            f"Face hub is offline. Fine-tune `minilm`, or import the model first: bentoservice "
            f"import NAME --model-id {model} --kind rerank",
            "model",
            "model_not_found",
        ) from None


def _fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    short = job_id.removeprefix("ftjob-")[:8]
    return f"ft:{base}:{suffix}:{short}" if suffix else f"ft:{base}:{short}"


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    request, config = job["request"], job["config"]
    args = config.get("args", {})
    method = {"sft": "supervised", "grpo": "reinforcement"}.get(config["method"], config["method"])
    hyper = {
        "n_epochs": args.get("num_train_epochs"),
        "batch_size": args.get("per_device_train_batch_size"),
        "learning_rate_multiplier": round(args.get("learning_rate", 0) / default_learning_rate(config), 6),
    }
    if method == "reinforcement":  # OpenAI's batch_size counts prompts, TRL's completions
        hyper["batch_size"] = reinforcement.hyperparameters(config)["batch_size"]
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
        "model": job["model"],
        "fine_tuned_model": (job["fine_tuned_model"] if job["status"] == "succeeded" else None),
        "organization_id": "bentoservice",
        "result_files": job["result_files"] or [],
        "status": job["status"],
        "training_file": request["training_file"],
        "validation_file": request.get("validation_file"),
        "hyperparameters": hyper,
        "trained_tokens": job["trained_tokens"],
        "error": job["error"],
        "seed": args.get("seed"),
        "integrations": [{"type": kind, kind: config[kind]} for kind in ("wandb", "trackio") if config.get(kind)],
        "estimated_finish": job["estimated_finish"] if job["status"] == "running" else None,
        "metadata": request.get("metadata"),
        "user_provided_suffix": request.get("suffix"),
        "method": {"type": method, method: _method_block(method, config, hyper)},
        # Beyond OpenAI's object: the before/after evaluation (methods.evaluation), once the job has one.
        "evaluation": job["evaluation"],
        # OpenWeights' view of the same job.
        "params": {
            "model": job["model"],
            "loss": config["method"],
            **config.get("args", {}),
            **({"meta": request["meta"]} if request.get("meta") else {}),
        },
        "outputs": {
            "model": job["fine_tuned_model"] if job["status"] == "succeeded" else None,
            "store_tag": job["store_tag"],
        },
    }


def _method_block(method: str, config: dict[str, Any], hyper: dict[str, Any]) -> dict[str, Any]:
    if method == "reinforcement":
        return {
            "grader": config["grader"],
            "response_format": None,
            "hyperparameters": {**hyper, **reinforcement.hyperparameters(config)},
        }
    return {"hyperparameters": {**hyper, **({"beta": config.get("beta", 0.1)} if method in ("dpo", "orpo") else {})}}


def _job(jobs: JobStore, job_id: str) -> dict[str, Any]:
    job = jobs.get_job(job_id)
    if job is None:
        raise APIError(404, f"No fine-tuning job with id {job_id!r}", "fine_tuning_job_id", "job_not_found")
    return job


def create_job(jobs: JobStore, body: JobRequest) -> dict[str, Any]:
    """Check a job body against the store and the uploaded files, and queue the job (raises APIError)."""
    method = training_method(body)
    encoder = method in encoder_config.ENCODER_METHODS
    base = _encoder_base(body.model) if encoder else _base(body.model).name
    train = _file(jobs, body.training_file, "training_file", KIND[method])
    validation = body.validation_file or body.test_file
    test = _file(jobs, validation, "validation_file", KIND[method]) if validation else None
    prompts_ref = body.evaluation.prompts_file if body.evaluation else None
    prompts = _file(jobs, prompts_ref, "evaluation.prompts_file", KIND[method]) if prompts_ref else None
    job_id = new_id("ftjob")
    config = job_config(body, job_id, base, train, test, method, prompts)
    request_body = body.model_dump(exclude_none=True)
    job = jobs.add_job(
        id=job_id,
        model=body.model,
        request=request_body,
        config=config,
        fine_tuned_model=_fine_tuned_name(base.split("/")[-1], body.suffix, job_id),
    )
    jobs.add_event(job_id, f"Created fine-tuning job: {job_id}")
    return job_object(job)


@router.post("/fine_tuning/jobs", responses=ok(Job))
async def create(body: JobRequest, request: Request) -> dict[str, Any]:
    # In a thread: a reinforcement job's score_model grader asks this same server whether its model exists.
    return await run_in_threadpool(create_job, job_store(request), body)


@router.get("/fine_tuning/jobs", responses=ok(listing(Job)))
async def list_jobs(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    """OpenAI's filter `metadata[key]=value` keeps the jobs whose metadata has that pair."""
    metadata = {
        m[1]: value for name, value in request.query_params.items() if (m := re.fullmatch(r"metadata\[(.+)\]", name))
    }
    rows, more = job_store(request).list_jobs(after, limit, metadata)
    return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}", responses=ok(Job))
async def retrieve(job_id: str, request: Request) -> dict[str, Any]:
    return job_object(_job(job_store(request), job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", responses=ok(Job))
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    jobs = job_store(request)
    job = _job(jobs, job_id)
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise APIError(400, f"the job is already {job['status']}", "fine_tuning_job_id", "job_finished")
    request_cancel(jobs, job_id)
    return job_object(_job(jobs, job_id))


@router.post("/fine_tuning/jobs/{job_id}/pause", responses=ok(Job))
async def pause(job_id: str, request: Request) -> dict[str, Any]:
    """The runner saves a checkpoint and exits, freeing the device; the job waits as `paused`."""
    jobs = job_store(request)
    job = _job(jobs, job_id)
    if not request_pause(jobs, job_id):
        raise APIError(
            400,
            f"only a running job can be paused; this one is {job['status']}",
            "fine_tuning_job_id",
            "job_not_running",
        )
    return job_object(_job(jobs, job_id))


@router.post("/fine_tuning/jobs/{job_id}/resume", responses=ok(Job))
async def resume(job_id: str, request: Request) -> dict[str, Any]:
    """Queue a paused job; it continues from its checkpoint (same data order, optimizer and scheduler state)."""
    jobs = job_store(request)
    job = _job(jobs, job_id)
    if not request_resume(jobs, job_id):
        raise APIError(
            400,
            f"only a paused job can be resumed; this one is {job['status']}",
            "fine_tuning_job_id",
            "job_not_paused",
        )
    return job_object(_job(jobs, job_id))


def _event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"ftevent-{row['seq']}",
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": row["data"] or {},
        "type": row["type"],
    }


@router.get("/fine_tuning/jobs/{job_id}/events", responses=ok(listing(JobEvent)))
async def list_events(
    job_id: str, request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 20
) -> dict[str, Any]:
    jobs = job_store(request)
    _job(jobs, job_id)
    anchor = int(after.removeprefix("ftevent-")) if after and re.fullmatch(r"ftevent-\d+", after) else None
    rows, more = jobs.list_events(job_id, anchor, limit)
    return {"object": "list", "data": [_event_object(r) for r in rows], "has_more": more}


def _checkpoint_object(row: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    metrics = {
        "step": row["step"],
        **{k: v for k, v in with_openai_names(row["metrics"] or {}).items() if isinstance(v, (int, float))},
    }
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuning_job_id": job["id"],
        "step_number": row["step"],
        "metrics": metrics,
        "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{row['step']}",
        "path": row["path"],
    }


def _checkpoints(jobs: JobStore, job_id: str) -> list[dict[str, Any]]:
    job = _job(jobs, job_id)
    return [_checkpoint_object(r, job) for r in jobs.list_checkpoints(job_id)]


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", responses=ok(listing(FineTuningJobCheckpoint)))
async def list_checkpoints(job_id: str, request: Request) -> dict[str, Any]:
    data = _checkpoints(job_store(request), job_id)
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# --- OPEA's calls ----------------------------------------------------------------------------


@router.post("/fine_tuning/jobs/retrieve", responses=ok(Job))
async def opea_retrieve(body: JobRef, request: Request) -> dict[str, Any]:
    return job_object(_job(job_store(request), body.fine_tuning_job_id))


@router.post("/fine_tuning/jobs/cancel", responses=ok(Job))
async def opea_cancel(body: JobRef, request: Request) -> dict[str, Any]:
    return await cancel(body.fine_tuning_job_id, request)


@router.post("/finetune/list_checkpoints")
async def opea_checkpoints(body: JobRef, request: Request) -> list[dict[str, Any]]:
    return _checkpoints(job_store(request), body.fine_tuning_job_id)


def submit_and_wait(jobs: JobStore, body: dict[str, Any]) -> dict[str, Any]:
    """A job from a body (the service's fine_tune task), once it ends; failures as OpenAI's error envelope (a task
    that raises can stay in_progress)."""
    try:
        created = create_job(jobs, JobRequest.model_validate(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        return {
            "error": {
                "message": first["msg"],
                "type": "invalid_request_error",
                "code": "invalid_value",
                "param": ".".join(str(p) for p in first["loc"]) or None,
            }
        }
    except APIError as exc:
        return {
            "error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param, "code": exc.code}
        }
    while (current := jobs.get_job(created["id"])) is not None and current["status"] not in FINAL:
        time.sleep(1)
    assert current is not None  # jobs are never deleted
    return job_object(current)
