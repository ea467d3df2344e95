"""A fine-tuning job's body in OpenAI's, OpenWeights' or OPEA's dialect, translated into the job's config (plain
data: no torch on this side): the method, the TrainingArguments, the LoRA settings and the scale."""

from __future__ import annotations

import importlib.util
import secrets
from typing import Any

from bentoservice.api.errors import APIError
from bentoservice.api.fine_tuning import reinforcement
from bentoservice.api.fine_tuning.protocol import (
    OPEA_DEFAULTS,
    DatasetBlock,
    EmbeddingTrainingBlock,
    EvaluationBlock,
    GeneralBlock,
    Hyperparameters,
    JobRequest,
    LoraBlock,
    TrackioIntegration,
    TrainingBlock,
)
from bentoservice.config import get_settings
from bentoservice.training import hardware
from bentoservice.training.config import LORA_LEARNING_RATE, TrainingError
from bentoservice.training.data import filestore
from bentoservice.training.distributed import backends
from bentoservice.training.methods import encoder_config

TASKS = {
    "instruction_tuning": "sft",
    "sft": "sft",
    "dpo": "dpo",
    "orpo": "orpo",
    "rerank": "rerank",
    "embedding": "embedding",
}
KIND = {
    "sft": "sft",
    "dpo": "preference",
    "orpo": "preference",
    "grpo": "prompts",
    "rerank": "rerank",
    "embedding": "rerank",
}
WANTED = {
    "sft": "SFT conversations",
    "preference": "preference pairs",
    "rerank": "rerank data (query, pos, neg)",
    "prompts": "chat prompts (messages ending with a user turn)",
}
# OpenAI's method types and the method each trains with.
METHOD_TYPES = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != "auto"), None)


def _check_method(body: JobRequest) -> None:
    """A method block other than the one `method.type` names, or a `loss` that names another method, would be
    dropped: a 400 naming it instead."""
    assert body.method is not None
    for name in sorted(body.method.model_fields_set - {"type"}):
        if name != body.method.type and getattr(body.method, name) is not None:
            raise APIError(
                400,
                f"method.{name} is given, but method.type is {body.method.type!r}: give the block of that type",
                f"method.{name}",
                "invalid_method",
            )
    implied = METHOD_TYPES[body.method.type]
    if body.loss and body.loss != implied and (body.loss, implied) != ("orpo", "dpo"):  # ORPO takes DPO's block
        raise APIError(
            400,
            f"loss {body.loss!r} and method.type {body.method.type!r} name different methods",
            "loss",
            "invalid_method",
        )


def training_method(body: JobRequest) -> str:
    if body.method:
        _check_method(body)
    if body.loss:
        return body.loss
    if body.method:
        return METHOD_TYPES[body.method.type]
    task = body.General.task if body.General else "instruction_tuning"
    if task not in TASKS:
        raise APIError(
            400, f"General.task {task!r} is not supported; use {', '.join(TASKS)}", "General.task", "unsupported_task"
        )
    return TASKS[task]


def _method_hyperparameters(body: JobRequest) -> Hyperparameters:
    if body.method is None:
        return Hyperparameters()
    block = getattr(body.method, body.method.type)
    if block is None:
        return Hyperparameters()
    # The epochs, batch size and learning rate every method shares.
    return Hyperparameters.model_validate(block.hyperparameters.model_dump(include=set(Hyperparameters.model_fields)))


def _dpo_beta(body: JobRequest) -> float | str | None:
    dpo = body.method.dpo if body.method else None
    return dpo.hyperparameters.beta if dpo is not None else None


def default_learning_rate(config: dict[str, Any]) -> float:
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
        "per_device_train_batch_size": _first(
            body.per_device_train_batch_size, hyper.batch_size, top.batch_size, training.batch_size
        )
        or 4,
        "learning_rate": _first(body.learning_rate, training.learning_rate) or default_learning_rate * multiplier,
        "gradient_accumulation_steps": _first(body.gradient_accumulation_steps, training.gradient_accumulation_steps),
        "warmup_steps": body.warmup_steps,
        "max_steps": _first(body.max_steps, training.max_train_steps),
        "logging_steps": _first(body.logging_steps, training.logging_steps) or 1,
        "lr_scheduler_type": training.lr_scheduler,
        "weight_decay": training.weight_decay,
        # OpenAI picks a seed when none is given and shows it; a resumed run needs the same one.
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
        "output_dir": str(get_settings().jobs_dir / job_id / "output"),
        "save_strategy": "steps" if body.save_steps else "epoch",
        "save_steps": body.save_steps,
    }
    if test:
        args.update(eval_strategy=args["save_strategy"], eval_steps=body.save_steps)
    # An unset value stays out: the trainer's default applies, and the adapter's store metadata takes no None.
    return {k: v for k, v in args.items() if v is not None}


def _lora_settings(body: JobRequest, opea_lora: LoraBlock) -> dict[str, Any]:
    """The LoRA settings of a job: OpenWeights' top-level fields, else OPEA's General.lora_config."""
    return {
        "r": _first(body.r, opea_lora.r),
        "lora_alpha": _first(body.lora_alpha, opea_lora.lora_alpha),
        "lora_dropout": _first(body.lora_dropout, opea_lora.lora_dropout),
        "target_modules": _first(body.target_modules, opea_lora.target_modules),
    }


# OpenWeights' optimizer names as TrainingArguments.optim; Adam without decoupled weight decay has no equivalent there.
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd"}
# OpenWeights fields and the value of each that is the only one this product trains with.
FIXED = {
    "is_peft": (True, "LLM jobs train LoRA adapters"),
    "train_on_responses_only": (True, "the loss is always on the assistant's tokens only"),
    "use_rslora": (False, "rank-stabilised LoRA is not supported (the served adapter scales by lora_alpha/r)"),
    "chat_template": ("default", "the base model's own chat template formats the data"),
    "finetuned_model_id": (
        None,
        "models stay in this server's store, not on the Hugging Face hub: name one with suffix",
    ),
    "push_to_private": (None, "models stay in this server's store, not on the Hugging Face hub"),
}


def _openweights_options(body: JobRequest, config: dict[str, Any]) -> None:
    """OpenWeights' training fields that apply here; a value that does not is a 400 naming the field."""
    for name, (only, why) in FIXED.items():
        if getattr(body, name) != only:
            raise APIError(400, f"{name}={getattr(body, name)!r} does not apply here: {why}", name, "unsupported")
    if body.optim == "adam":
        raise APIError(400, "optim 'adam' is not available; use adamw, adamw_8bit or sgd", "optim", "unsupported")
    if body.optim == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise APIError(
            400, "optim 'adamw_8bit' needs bitsandbytes, which is not installed here", "optim", "unsupported"
        )
    if body.lora_bias is not None:
        config["bias"] = body.lora_bias
    if body.packing is not None:
        config["packing"] = body.packing
    args = {
        "optim": OPTIMIZERS.get(body.optim or ""),
        "weight_decay": body.weight_decay,
        "lr_scheduler_type": body.lr_scheduler_type,
        "per_device_eval_batch_size": body.eval_batch_size,
        "eval_steps": body.test_file_eval_steps,
        "eval_strategy": body.test_file_eval_strategy,
    }
    config["args"].update({k: v for k, v in args.items() if v is not None})


def _training_config(
    body: JobRequest, job_id: str, base_name: str, train: dict, test: dict | None, method: str
) -> dict[str, Any]:
    """The TrainingConfig fields the runner will use (plain data: no torch on this side)."""
    opea_lora = body.General.lora_config if body.General else LoraBlock()
    if opea_lora is None:
        raise APIError(
            400,
            "General.lora_config: null (full fine-tuning) is only for rerank and embedding "
            "tasks; LLM jobs train LoRA adapters",
            "General.lora_config",
            "unsupported",
        )
    training, dataset = body.Training or TrainingBlock(), body.Dataset or DatasetBlock()
    config = {
        "model": base_name,
        "method": method,
        "train_file": filestore.file_url(train["id"]),
        "test_file": filestore.file_url(test["id"]) if test else None,
        "adapter_name": f"ft-{job_id.removeprefix('ftjob-')}",
        **_lora_settings(body, opea_lora),
        "beta": _first(body.beta, _dpo_beta(body), training.dpo_beta),
        "max_seq_length": _first(body.max_seq_length, dataset.max_length),
        "merge_before_push": body.merge_before_push,
        "adapter_type": "qlora" if body.load_in_4bit else "lora",
        "args": _trainer_args(body, job_id, LORA_LEARNING_RATE[method], test),
    }
    _openweights_options(body, config)
    return {k: v for k, v in config.items() if v is not None}


def _encoder_config(
    body: JobRequest, job_id: str, base_name: str, train: dict, test: dict | None, method: str
) -> dict[str, Any]:
    """The EncoderConfig fields of a rerank or embedding job. As in OPEA these train in full; LoRA (merged into
    the stored model) only when the body gives General.lora_config."""
    general, dataset = body.General or GeneralBlock(), body.Dataset or DatasetBlock()
    training = body.Training or TrainingBlock()
    opea_lora = general.lora_config if "lora_config" in general.model_fields_set else None
    lora = None if opea_lora is None else _lora_settings(body, opea_lora)
    config = {
        "method": method,
        "model": base_name,
        "train_file": filestore.file_url(train["id"]),
        "test_file": filestore.file_url(test["id"]) if test else None,
        "adapter_name": f"ft-{job_id.removeprefix('ftjob-')}",
        "lora": None if lora is None else {k: v for k, v in lora.items() if v is not None},
        "group_size": dataset.train_group_size,
        "max_seq_length": _first(body.max_seq_length, dataset.max_length),
        "query_max_len": dataset.query_max_len,
        "passage_max_len": dataset.passage_max_len,
        "query_instruction": dataset.query_instruction_for_retrieval,
        "passage_instruction": dataset.passage_instruction_for_retrieval,
        "temperature": (training.embedding_training_config or EmbeddingTrainingBlock()).temperature,
    }
    config["args"] = _trainer_args(body, job_id, default_learning_rate(config), test)
    return {k: v for k, v in config.items() if v is not None}


def _add_scale(body: JobRequest, config: dict[str, Any]) -> None:
    """Where and over how many processes the job trains, and the training arguments that spreads it so."""
    fields = body.model_dump(include={"backend", "num_workers", "gpus_per_worker", "distributed"}, exclude_none=True)
    try:
        scale = backends.check(backends.Scale(**fields))
    except backends.BackendError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_scale") from None
    if scale.num_workers > 1 and config["method"] in encoder_config.ENCODER_METHODS:
        raise APIError(
            400, "rerank and embedding jobs train in one process: num_workers must be 1", "num_workers", "invalid_scale"
        )
    config["scale"] = scale.model_dump()
    config["args"].update(backends.DISTRIBUTED_ARGS[scale.distributed])


def _add_evaluation(
    body: JobRequest, config: dict[str, Any], test: dict[str, Any] | None, prompts: dict[str, Any] | None
) -> None:
    """The before/after evaluation: asked for, or by default for a job with a validation file."""
    if body.evaluation is None and test is None:
        return
    if config["method"] == "grpo":
        if body.evaluation is not None:
            raise APIError(
                400,
                "a reinforcement job is evaluated by its grader: the reward on the validation_file "
                "(eval_interval, eval_samples), not an evaluation block",
                "evaluation",
                "unsupported",
            )
        return
    if test is None and prompts is None:
        raise APIError(
            400,
            "evaluation needs a validation_file (held-out figures, samples) or evaluation.prompts_file (samples)",
            "evaluation",
            "missing_validation_file",
        )
    block = body.evaluation or EvaluationBlock()
    if config["method"] in encoder_config.ENCODER_METHODS and block.max_tokens is not None:
        raise APIError(
            400,
            "evaluation.max_tokens is for generations: a rerank or embedding job's evaluation ranks passages",
            "evaluation.max_tokens",
            "unsupported",
        )
    config["evaluation"] = {
        "prompts_file": filestore.file_url(prompts["id"]) if prompts else None,
        **block.model_dump(include={"max_tokens", "samples"}, exclude_none=True),
    }


def _add_integrations(body: JobRequest, config: dict[str, Any], job_id: str) -> None:
    """wandb or trackio: the runner logs through TRL's report_to into the job's folder (see training.jobs.runner)."""
    if not body.integrations:
        return
    integration = body.integrations[0]
    if importlib.util.find_spec(integration.type) is None:
        raise APIError(
            400,
            f"the {integration.type} integration needs {integration.type}, which is not installed on this server: "
            "pip install 'bentoservice[tracking]'",
            "integrations",
            "integration_unavailable",
        )
    folder = str(get_settings().jobs_dir / job_id / integration.type)
    if isinstance(integration, TrackioIntegration):
        trackio = integration.trackio
        # No Space: the run stays in the local folder (trackio_static_space_id=False: nothing pushed at the end).
        config["args"].update(
            report_to=["trackio"],
            run_name=trackio.name or job_id,
            project=trackio.project,
            trackio_static_space_id=False,
        )
        config["trackio"] = {**trackio.model_dump(exclude_none=True), "dir": folder}
        return
    wandb = integration.wandb
    config["args"].update(report_to=["wandb"], run_name=wandb.name or job_id)
    config["wandb"] = {**wandb.model_dump(exclude_none=True), "run_id": job_id, "dir": folder}


def _check_opea_blocks(body: JobRequest) -> None:
    """OPEA's fields this server does not act on pass at OPEA's defaults only; a key OPEA has not is a typo."""
    general, training = body.General, body.Training
    blocks = {
        "General": general,
        "General.lora_config": general.lora_config if general else None,
        "Dataset": body.Dataset,
        "Training": training,
        "Training.embedding_training_config": training.embedding_training_config if training else None,
    }
    for where, block in blocks.items():
        for key, value in ((block.model_extra or {}) if block is not None else {}).items():
            param = f"{where}.{key}"
            if key not in OPEA_DEFAULTS[where]:
                raise APIError(400, f"{param} is not a field of OPEA's {where} block", param, "unknown_field")
            if value != OPEA_DEFAULTS[where][key]:
                raise APIError(
                    400,
                    f"{param}={value!r} does not apply here: this server accepts only OPEA's default "
                    f"({OPEA_DEFAULTS[where][key]!r}) for it",
                    param,
                    "unsupported",
                )


def job_config(
    body: JobRequest,
    job_id: str,
    base_name: str,
    train: dict[str, Any],
    test: dict[str, Any] | None,
    method: str,
    prompts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one place a job body, in any dialect, becomes the config the runner trains from."""
    _check_opea_blocks(body)
    config = (_encoder_config if method in encoder_config.ENCODER_METHODS else _training_config)(
        body, job_id, base_name, train, test, method
    )
    if method == "grpo":
        reinforcement.configure(body, config, train, test)
    elif body.max_completion_tokens is not None:
        raise APIError(400, "max_completion_tokens is for reinforcement jobs", "max_completion_tokens", "unsupported")
    _add_scale(body, config)
    _check_4bit(body, method, config["scale"]["backend"])
    _add_evaluation(body, config, test, prompts)
    _add_integrations(body, config, job_id)
    return config


def _check_4bit(body: JobRequest, method: str, backend: str) -> None:
    """QLoRA only where it can run: an LLM job, trained here on a CUDA GPU with bitsandbytes installed."""
    if not body.load_in_4bit:
        return
    if method in encoder_config.ENCODER_METHODS:
        raise APIError(
            400, "load_in_4bit is for LLM jobs (QLoRA), not rerank or embedding jobs", "load_in_4bit", "unsupported"
        )
    if backend == "local":
        try:
            hardware.check_adapter_type("qlora", hardware.detect_device())
        except TrainingError as exc:
            raise APIError(400, str(exc), "load_in_4bit", "unsupported") from None
