"""Fine-tuning jobs as the openai SDK calls them, plus OpenWeights' body fields and OPEA's calls."""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Request
from huggingface_hub import constants as hub_constants
from pydantic import BaseModel, ConfigDict, Field

from bentoservice import store
from bentoservice.api.errors import APIError, unknown_model
from bentoservice.api.files.routes import job_store
from bentoservice.config import get_settings
from bentoservice.training.data import filestore
from bentoservice.training.distributed import backends
from bentoservice.training.methods import encoder_config
from bentoservice.training.config import LORA_LEARNING_RATE
from bentoservice.training.jobs.store import JobStore, new_id
from bentoservice.training.jobs.queue import request_cancel

router = APIRouter()

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    n_epochs: int | Auto | None = Field(None)
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    beta: float | Auto | None = None


class MethodBlock(BaseModel):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(BaseModel):
    type: Literal["supervised", "dpo"]
    supervised: MethodBlock | None = None
    dpo: MethodBlock | None = None


class LoraBlock(BaseModel):
    """OPEA's General.lora_config."""

    model_config = ConfigDict(extra="ignore")
    r: int | None = Field(None, gt=0)
    lora_alpha: int | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None


class GeneralBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    task: str = "instruction_tuning"
    lora_config: LoraBlock | None = LoraBlock()


class DatasetBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_length: int | None = Field(None, gt=0)
    # Rerank and embedding tasks (FlagEmbedding's names).
    train_group_size: int | None = Field(None, ge=2)
    query_max_len: int | None = Field(None, gt=0)
    passage_max_len: int | None = Field(None, gt=0)
    query_instruction_for_retrieval: str | None = None
    passage_instruction_for_retrieval: str | None = None


class EmbeddingTrainingBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(None, gt=0)


class TrainingBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    epochs: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    max_train_steps: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    logging_steps: int | None = Field(None, gt=0)
    lr_scheduler: str | None = None
    weight_decay: float | None = Field(None, ge=0)
    dpo_beta: float | None = Field(None, gt=0)
    embedding_training_config: EmbeddingTrainingBlock | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    # OpenWeights' names.
    loss: Literal["sft", "dpo", "orpo"] | None = None
    epochs: int | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    beta: float | None = Field(None, gt=0)
    r: int | None = Field(None, gt=0)
    lora_alpha: int | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | str | None = None
    max_seq_length: int | None = Field(None, gt=0)
    per_device_train_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    max_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    logging_steps: int | None = Field(None, gt=0)
    test_file: str | None = None
    merge_before_push: bool = False
    # Scaling out (training.backends): where the job trains, over how many data-parallel worker processes.
    backend: Literal["local", "ray"] | None = None
    num_workers: int | None = Field(None, ge=1, le=1024)
    gpus_per_worker: float | None = Field(None, ge=0)
    distributed: Literal["ddp", "fsdp", "deepspeed"] | None = None
    # OPEA's blocks.
    General: GeneralBlock | None = None
    Dataset: DatasetBlock | None = None
    Training: TrainingBlock | None = None


class JobRef(BaseModel):
    fine_tuning_job_id: str


TASKS = {"instruction_tuning": "sft", "sft": "sft", "dpo": "dpo", "orpo": "orpo", "rerank": "rerank",
         "embedding": "embedding"}
KIND = {"sft": "sft", "dpo": "preference", "orpo": "preference", "rerank": "rerank", "embedding": "rerank"}
WANTED = {"sft": "SFT conversations", "preference": "preference pairs", "rerank": "rerank data (query, pos, neg)"}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != "auto"), None)


def _training_method(body: JobRequest) -> str:
    if body.loss:
        return body.loss
    if body.method:
        return "sft" if body.method.type == "supervised" else "dpo"
    task = body.General.task if body.General else "instruction_tuning"
    if task not in TASKS:
        raise APIError(400, f"General.task {task!r} is not supported; use {', '.join(TASKS)}",
                       "General.task", "unsupported_task")
    return TASKS[task]


def _method_hyperparameters(body: JobRequest) -> Hyperparameters:
    if body.method is None:
        return Hyperparameters()
    block = body.method.supervised if body.method.type == "supervised" else body.method.dpo
    return block.hyperparameters if block else Hyperparameters()


def _file(jobs: JobStore, ref: str, param: str, kind: str) -> dict[str, Any]:
    row = jobs.find_file(ref)
    if row is None:
        raise APIError(400, f"invalid {param}: no uploaded file {ref!r}", param, "file_not_found")
    if row["kind"] != kind:
        raise APIError(400, f"invalid {param}: {ref} holds {row['kind']} data, but this job needs {WANTED[kind]}",
                       param, "invalid_file_kind")
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
        raise APIError(404, f"The model `{model}` does not exist: it is not in the model store and the Hugging "
                            f"Face hub is offline. Fine-tune `minilm`, or import the model first: bentoservice "
                            f"import NAME --model-id {model} --kind rerank", "model", "model_not_found") from None


def _default_learning_rate(config: dict[str, Any]) -> float:
    if config["method"] in encoder_config.ENCODER_METHODS:
        return encoder_config.FULL_LEARNING_RATE if config.get("lora") is None else encoder_config.LORA_LEARNING_RATE
    return LORA_LEARNING_RATE[config["method"]]


def _trainer_args(body: JobRequest, job_id: str, default_learning_rate: float, test: dict | None) -> dict[str, Any]:
    """The TrainingArguments a job body sets, the same for every method."""
    top, hyper = body.hyperparameters or Hyperparameters(), _method_hyperparameters(body)
    training = body.Training or TrainingBlock()
    multiplier = _first(hyper.learning_rate_multiplier, top.learning_rate_multiplier) or 1.0
    args = {
        "num_train_epochs": _first(body.epochs, hyper.n_epochs, top.n_epochs, training.epochs) or 3,
        "per_device_train_batch_size": _first(body.per_device_train_batch_size, hyper.batch_size,
                                              top.batch_size, training.batch_size) or 4,
        "learning_rate": _first(body.learning_rate, training.learning_rate) or default_learning_rate * multiplier,
        "gradient_accumulation_steps": _first(body.gradient_accumulation_steps, training.gradient_accumulation_steps),
        "warmup_steps": body.warmup_steps,
        "max_steps": _first(body.max_steps, training.max_train_steps),
        "logging_steps": _first(body.logging_steps, training.logging_steps) or 1,
        "lr_scheduler_type": training.lr_scheduler,
        "weight_decay": training.weight_decay,
        "seed": body.seed,
        "output_dir": str(get_settings().jobs_dir / job_id / "output"),
        "save_strategy": "steps" if body.save_steps else "epoch",
        "save_steps": body.save_steps,
    }
    args = {k: v for k, v in args.items() if v is not None}
    if test:
        args.update(eval_strategy=args["save_strategy"], eval_steps=body.save_steps)
    return args


def _training_config(body: JobRequest, job_id: str, base_name: str, train: dict, test: dict | None,
                     method: str) -> dict[str, Any]:
    """The TrainingConfig fields the runner will use (plain data: no torch on this side)."""
    hyper = _method_hyperparameters(body)
    opea_lora = body.General.lora_config if body.General else LoraBlock()
    if opea_lora is None:
        raise APIError(400, "General.lora_config: null (full fine-tuning) is only for rerank and embedding "
                            "tasks; LLM jobs train LoRA adapters", "General.lora_config", "unsupported")
    training, dataset = body.Training or TrainingBlock(), body.Dataset or DatasetBlock()
    config = {
        "model": base_name, "method": method, "train_file": filestore.file_url(train["id"]),
        "test_file": filestore.file_url(test["id"]) if test else None,
        "adapter_name": f"ft-{job_id.removeprefix('ftjob-')}",
        "r": _first(body.r, opea_lora.r), "lora_alpha": _first(body.lora_alpha, opea_lora.lora_alpha),
        "lora_dropout": _first(body.lora_dropout, opea_lora.lora_dropout),
        "target_modules": _first(body.target_modules, opea_lora.target_modules),
        "beta": _first(body.beta, hyper.beta, training.dpo_beta),
        "max_seq_length": _first(body.max_seq_length, dataset.max_length),
        "merge_before_push": body.merge_before_push,
        "args": _trainer_args(body, job_id, LORA_LEARNING_RATE[method], test),
    }
    return {k: v for k, v in config.items() if v is not None}


def _encoder_config(body: JobRequest, job_id: str, base_name: str, train: dict, test: dict | None,
                    method: str) -> dict[str, Any]:
    """The EncoderConfig fields of a rerank or embedding job. As in OPEA these train in full; LoRA (merged into
    the stored model) only when the body gives General.lora_config."""
    general, dataset = body.General or GeneralBlock(), body.Dataset or DatasetBlock()
    training = body.Training or TrainingBlock()
    opea_lora = general.lora_config if "lora_config" in general.model_fields_set else None
    lora = None if opea_lora is None else {
        "r": _first(body.r, opea_lora.r), "lora_alpha": _first(body.lora_alpha, opea_lora.lora_alpha),
        "lora_dropout": _first(body.lora_dropout, opea_lora.lora_dropout),
        "target_modules": _first(body.target_modules, opea_lora.target_modules)}
    config = {
        "method": method, "model": base_name, "train_file": filestore.file_url(train["id"]),
        "test_file": filestore.file_url(test["id"]) if test else None,
        "adapter_name": f"ft-{job_id.removeprefix('ftjob-')}",
        "lora": None if lora is None else {k: v for k, v in lora.items() if v is not None},
        "group_size": dataset.train_group_size, "max_seq_length": _first(body.max_seq_length, dataset.max_length),
        "query_max_len": dataset.query_max_len, "passage_max_len": dataset.passage_max_len,
        "query_instruction": dataset.query_instruction_for_retrieval,
        "passage_instruction": dataset.passage_instruction_for_retrieval,
        "temperature": (training.embedding_training_config or EmbeddingTrainingBlock()).temperature,
    }
    config["args"] = _trainer_args(body, job_id, _default_learning_rate(config), test)
    return {k: v for k, v in config.items() if v is not None}


def _add_scale(body: JobRequest, config: dict[str, Any]) -> None:
    """Where and over how many processes the job trains, and the training arguments that spreads it so."""
    fields = body.model_dump(include={"backend", "num_workers", "gpus_per_worker", "distributed"}, exclude_none=True)
    try:
        scale = backends.check(backends.Scale(**fields))
    except backends.BackendError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_scale") from None
    if scale.num_workers > 1 and config["method"] in encoder_config.ENCODER_METHODS:
        raise APIError(400, "rerank and embedding jobs train in one process: num_workers must be 1", "num_workers",
                       "invalid_scale")
    config["scale"] = scale.model_dump()
    config["args"].update(backends.DISTRIBUTED_ARGS[scale.distributed])


def _fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    short = job_id.removeprefix("ftjob-")[:8]
    return f"ft:{base}:{suffix}:{short}" if suffix else f"ft:{base}:{short}"


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    request, config = job["request"], job["config"]
    args = config.get("args", {})
    method = "supervised" if config["method"] == "sft" else config["method"]
    hyper = {"n_epochs": args.get("num_train_epochs"), "batch_size": args.get("per_device_train_batch_size"),
             "learning_rate_multiplier": round(args.get("learning_rate", 0) / _default_learning_rate(config), 6)}
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"],
        "finished_at": job["finished_at"], "model": job["model"], "fine_tuned_model": (
            job["fine_tuned_model"] if job["status"] == "succeeded" else None),
        "organization_id": "bentoservice", "result_files": [], "status": job["status"],
        "training_file": request["training_file"], "validation_file": request.get("validation_file"),
        "hyperparameters": hyper, "trained_tokens": job["trained_tokens"], "error": job["error"],
        "seed": args.get("seed", 0), "estimated_finish": None, "integrations": [],
        "metadata": request.get("metadata"), "user_provided_suffix": request.get("suffix"),
        "method": {"type": method, method: {"hyperparameters": {**hyper, **(
            {"beta": config.get("beta", 0.1)} if method in ("dpo", "orpo") else {})}}},
        # OpenWeights' view of the same job.
        "params": {"model": job["model"], "loss": config["method"], **config.get("args", {})},
        "outputs": {"model": job["fine_tuned_model"] if job["status"] == "succeeded" else None,
                    "store_tag": job["store_tag"]},
    }


def _job(jobs: JobStore, job_id: str) -> dict[str, Any]:
    job = jobs.get_job(job_id)
    if job is None:
        raise APIError(404, f"No fine-tuning job with id {job_id!r}", "fine_tuning_job_id", "job_not_found")
    return job


def create_job(jobs: JobStore, body: JobRequest) -> dict[str, Any]:
    """Check a job body against the store and the uploaded files, and queue the job (raises APIError)."""
    method = _training_method(body)
    encoder = method in encoder_config.ENCODER_METHODS
    base = _encoder_base(body.model) if encoder else _base(body.model).name
    train = _file(jobs, body.training_file, "training_file", KIND[method])
    validation = body.validation_file or body.test_file
    test = _file(jobs, validation, "validation_file", KIND[method]) if validation else None
    job_id = new_id("ftjob")
    config = (_encoder_config if encoder else _training_config)(body, job_id, base, train, test, method)
    _add_scale(body, config)
    request_body = body.model_dump(exclude_none=True)
    job = jobs.add_job(id=job_id, model=body.model, request=request_body, config=config,
                       fine_tuned_model=_fine_tuned_name(base.split("/")[-1], body.suffix, job_id))
    jobs.add_event(job_id, f"Created fine-tuning job: {job_id}")
    return job_object(job)


@router.post("/fine_tuning/jobs")
async def create(body: JobRequest, request: Request) -> dict[str, Any]:
    return create_job(job_store(request), body)


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    rows, more = job_store(request).list_jobs(after, max(1, min(limit, 100)))
    return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve(job_id: str, request: Request) -> dict[str, Any]:
    return job_object(_job(job_store(request), job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    jobs = job_store(request)
    job = _job(jobs, job_id)
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise APIError(400, f"the job is already {job['status']}", "fine_tuning_job_id", "job_finished")
    request_cancel(jobs, job_id)
    return job_object(_job(jobs, job_id))


def _event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"ftevent-{row['seq']}", "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "data": row["data"] or {}, "type": row["type"]}


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
    jobs = job_store(request)
    _job(jobs, job_id)
    anchor = int(after.removeprefix("ftevent-")) if after and re.fullmatch(r"ftevent-\d+", after) else None
    rows, more = jobs.list_events(job_id, anchor, max(1, min(limit, 1000)))
    return {"object": "list", "data": [_event_object(r) for r in rows], "has_more": more}


def _checkpoint_object(row: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    metrics = {"step": row["step"], **{k: v for k, v in (row["metrics"] or {}).items()
                                       if isinstance(v, (int, float))}}
    if "loss" in metrics:
        metrics["train_loss"] = metrics["loss"]
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint", "created_at": row["created_at"],
            "fine_tuning_job_id": job["id"], "step_number": row["step"], "metrics": metrics,
            "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{row['step']}",
            "path": row["path"]}


def _checkpoints(jobs: JobStore, job_id: str) -> list[dict[str, Any]]:
    job = _job(jobs, job_id)
    return [_checkpoint_object(r, job) for r in jobs.list_checkpoints(job_id)]


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request) -> dict[str, Any]:
    data = _checkpoints(job_store(request), job_id)
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# --- OPEA's calls ----------------------------------------------------------------------------

@router.post("/fine_tuning/jobs/retrieve")
async def opea_retrieve(body: JobRef, request: Request) -> dict[str, Any]:
    return job_object(_job(job_store(request), body.fine_tuning_job_id))


@router.post("/fine_tuning/jobs/cancel")
async def opea_cancel(body: JobRef, request: Request) -> dict[str, Any]:
    return await cancel(body.fine_tuning_job_id, request)


@router.post("/finetune/list_checkpoints")
async def opea_checkpoints(body: JobRef, request: Request) -> list[dict[str, Any]]:
    return _checkpoints(job_store(request), body.fine_tuning_job_id)
