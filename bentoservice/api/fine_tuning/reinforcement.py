"""Reinforcement fine-tuning jobs (OpenAI's method type "reinforcement"): the method block checked at creation (the
grader, every line of the data against the fields the grader reads, the hyperparameters) and turned into the GRPO
settings of the job's config (training.methods.rl trains them)."""

from __future__ import annotations

from typing import Any

from bentoservice.api.errors import APIError
from bentoservice.api.fine_tuning.protocol import JobRequest, ReinforcementBlock
from bentoservice.training.data import filestore, formats
from bentoservice.training.graders import GraderError, ServiceModels, build_grader
from bentoservice.training.graders.templates import item_has

PARAM = "method.reinforcement"
# Completions sampled per prompt (TRL's num_generations) at compute_multiplier 1: GRPO's advantage is a reward
# against the mean of its group, so a group needs at least 2.
GENERATIONS_PER_COMPUTE = 4
MAX_GENERATIONS = 64
# A sampled completion's length when the body sets no max_completion_tokens (TRL's 512 is minutes a step on a CPU).
COMPLETION_TOKENS = 128


def _block(body: JobRequest) -> ReinforcementBlock:
    assert body.method is not None  # only reinforcement jobs come here
    if body.method.reinforcement is None:
        raise APIError(400, "a reinforcement job needs method.reinforcement with a grader", PARAM, "missing_grader")
    return body.method.reinforcement


def num_generations(compute_multiplier: float | None) -> int:
    return min(MAX_GENERATIONS, max(2, round(GENERATIONS_PER_COMPUTE * (compute_multiplier or 1.0))))


def _check_lines(file: dict[str, Any], param: str, fields: set[str]) -> None:
    """Every line of `file` holds the item fields the grader reads; a 400 names the first line that does not."""
    data = b"".join(filestore.chunks(filestore.file_url(file["id"])))
    dataset = formats.parse_bytes(data, file["filename"], expect="prompts")
    for row, line in zip(dataset.rows, dataset.lines, strict=True):
        missing = sorted(path for path in fields if not item_has(row["item"], path))
        if missing:
            raise APIError(
                400,
                f"{param} {dataset.unit} {line}: the grader reads item.{missing[0]}, which this line does not have",
                param,
                "missing_grader_field",
            )


def configure(body: JobRequest, config: dict[str, Any], train: dict[str, Any], test: dict[str, Any] | None) -> None:
    """Check a reinforcement job's method block and data and set its config's grader and GRPO arguments."""
    block = _block(body)
    hyper = block.hyperparameters
    if block.response_format is not None:
        raise APIError(
            400,
            "response_format is not supported yet: rollouts come from TRL's generation, which takes no grammar "
            "(docs/fine-tuning.md); grade the JSON with {{sample.output_json}} instead",
            f"{PARAM}.response_format",
            "unsupported",
        )
    if hyper.reasoning_effort not in (None, "default"):
        raise APIError(
            400,
            f"reasoning_effort {hyper.reasoning_effort!r} does not apply: the models served here have no reasoning "
            "effort setting; leave it out or use 'default'",
            f"{PARAM}.hyperparameters.reasoning_effort",
            "unsupported",
        )
    try:
        grader = build_grader(block.grader, ServiceModels.from_settings())
    except GraderError as exc:
        raise APIError(400, f"invalid grader: {exc.message}", f"{PARAM}.{exc.param}", "invalid_grader") from None
    fields = {ref.removeprefix("item.") for ref in grader.references()}
    _check_lines(train, "training_file", fields)
    if test is not None:
        _check_lines(test, "validation_file", fields)
    args = config["args"]
    interval = None if hyper.eval_interval == "auto" else hyper.eval_interval
    if test is None and (interval is not None or hyper.eval_samples not in (None, "auto")):
        which = "eval_interval" if interval is not None else "eval_samples"
        raise APIError(
            400,
            f"{which} is for the held-out reward on a validation_file, and this job has none",
            f"{PARAM}.hyperparameters.{which}",
            "missing_validation_file",
        )
    compute = None if hyper.compute_multiplier == "auto" else hyper.compute_multiplier
    generations = num_generations(compute)
    prompts = args["per_device_train_batch_size"]
    args.update(
        # TRL counts a batch in completions; OpenAI's batch_size counts prompts.
        per_device_train_batch_size=prompts * generations,
        num_generations=generations,
        max_completion_length=body.max_completion_tokens or COMPLETION_TOKENS,
    )
    if test is not None:
        samples = generations if hyper.eval_samples in (None, "auto") else hyper.eval_samples
        args.update(num_generations_eval=samples, per_device_eval_batch_size=prompts * samples)
        if interval is not None:
            args.update(eval_strategy="steps", eval_steps=interval)
    config["grader"] = block.grader


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The reinforcement hyperparameters a job shows, "auto" resolved (OpenAI's batch_size counts prompts)."""
    args = config["args"]
    generations = args["num_generations"]
    return {
        "batch_size": args["per_device_train_batch_size"] // generations,
        "compute_multiplier": generations / GENERATIONS_PER_COMPUTE,
        "eval_interval": args.get("eval_steps"),
        "eval_samples": args.get("num_generations_eval"),
        "reasoning_effort": "default",
    }
