"""The served models a grader may call (score_model's judge, cosine's embedding model), through this service's own
OpenAI-compatible API."""

from __future__ import annotations

from typing import Any, Protocol

import openai

from bentoservice.training.graders.errors import GradingFailed


class ModelClient(Protocol):
    def chat(self, model: str, messages: list[dict[str, Any]], **sampling: Any) -> str: ...

    def embed(self, model: str, texts: list[str]) -> list[list[float]]: ...

    def has_model(self, model: str) -> bool | None:
        """Whether `model` is served (base or adapter, any name form); None when that cannot be told."""
        ...


class ServiceModels:
    """A ModelClient over the official openai SDK; `usage` adds up each model's tokens (OpenAI's
    `model_grader_token_usage_per_model`)."""

    @classmethod
    def from_settings(cls) -> ServiceModels | None:
        """This service as its settings say (a job runner inherits the server's): BENTOSERVICE_SERVICE_URL, with an
        inference key when there is one (the least that may call models, chat and embeddings), else an admin key.
        None when no URL is set: graders that call models are then refused."""
        from bentoservice.config import get_settings

        settings = get_settings()
        if not settings.service_url:
            return None
        keys = settings.inference_keys() or settings.admin_keys()
        return cls(settings.service_url, keys[0] if keys else None)

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=1, timeout=timeout)
        self.usage: dict[str, dict[str, int]] = {}

    def chat(self, model: str, messages: list[dict[str, Any]], **sampling: Any) -> str:
        try:
            reply = self.client.chat.completions.create(model=model, messages=messages, **sampling)  # type: ignore[arg-type]
        except openai.APIError as exc:
            raise GradingFailed(f"the grader model `{model}` failed: {exc}", "model_grader_server_error") from exc
        if reply.usage is not None:
            total = self.usage.setdefault(
                model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
            )
            total["prompt_tokens"] += reply.usage.prompt_tokens
            total["completion_tokens"] += reply.usage.completion_tokens
            total["total_tokens"] += reply.usage.total_tokens
        return reply.choices[0].message.content or ""

    def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        try:
            reply = self.client.embeddings.create(model=model, input=texts)
        except openai.APIError as exc:
            raise GradingFailed(f"the embedding model `{model}` failed: {exc}", "other_error") from exc
        return [row.embedding for row in reply.data]

    def has_model(self, model: str) -> bool | None:
        try:
            self.client.models.retrieve(model)
        except openai.NotFoundError:
            return False
        except openai.APIError:
            return None
        return True
