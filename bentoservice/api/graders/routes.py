"""OpenAI's grader endpoints, to try a grader before a reinforcement job: POST /fine_tuning/alpha/graders/validate
and /run (admin key: the /fine_tuning prefix). A grader that calls models calls this service's own API, with the
caller's key."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from bentoservice.api.errors import APIError
from bentoservice.api.graders.protocol import RunBody, ValidateBody
from bentoservice.api.responses import GraderRunResponse, GraderValidateResponse, ok
from bentoservice.training.graders import GraderError, GradingFailed, ServiceModels, sample_of
from bentoservice.training.graders.build import from_spec, parse

router = APIRouter()

_ERRORS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
_DETAILS = {
    "model_grader_server_error": "model_grader_server_error_details",
    "python_grader_runtime_error": "python_grader_runtime_error_details",
}


def _models(request: Request) -> ServiceModels:
    """This service's /v1, as the request reached it, with the caller's own key."""
    base = str(request.url).split("/fine_tuning/alpha/")[0]
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return ServiceModels(base, token.strip() if scheme.lower() == "bearer" else None)


def _invalid(exc: GraderError) -> APIError:
    return APIError(400, exc.message, exc.param, "invalid_grader")


@router.post("/fine_tuning/alpha/graders/validate", responses=ok(GraderValidateResponse))
async def validate(body: ValidateBody, request: Request) -> dict[str, Any]:
    try:
        spec = parse(body.grader)
        await run_in_threadpool(from_spec, spec, _models(request))
    except GraderError as exc:
        raise _invalid(exc) from None
    return {"grader": spec.model_dump(mode="json", exclude_none=True)}


def _run(body: RunBody, models: ServiceModels) -> dict[str, Any]:
    spec = parse(body.grader)
    grader = from_spec(spec, models)
    errors: dict[str, Any] = dict.fromkeys(_ERRORS, False)
    started = time.perf_counter()
    try:
        result = grader.grade(sample_of(body.model_sample), body.item if body.item is not None else {})
        reward, scores = result.score, result.sub_scores
    except GradingFailed as exc:
        errors[exc.error] = True
        if exc.error in _DETAILS:
            errors[_DETAILS[exc.error]] = exc.message
        reward, scores = 0.0, {}
    tokens = sum(usage["total_tokens"] for usage in models.usage.values())
    return {
        "reward": reward,
        "metadata": {
            "name": grader.name,
            "type": spec.type,
            "errors": errors,
            "execution_time": time.perf_counter() - started,
            "scores": scores,
            "token_usage": tokens if models.usage else None,
            "sampled_model_name": None,
        },
        "sub_rewards": scores,
        "model_grader_token_usage_per_model": models.usage,
    }


@router.post("/fine_tuning/alpha/graders/run", responses=ok(GraderRunResponse))
async def run(body: RunBody, request: Request) -> dict[str, Any]:
    try:
        return await run_in_threadpool(_run, body, _models(request))
    except GraderError as exc:
        raise _invalid(exc) from None
