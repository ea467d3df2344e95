"""Settings, read from the environment (BENTOSERVICE_*) once per process."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _xdg(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / default)


def cache_root() -> Path:
    """Where this machine keeps what can be made again (fine-tune checkpoints, compiled kernels)."""
    return _xdg("XDG_CACHE_HOME", ".cache") / "bentoservice"


class AdapterSpec(BaseModel):
    """An adapter to load at start: a PEFT folder, a model store tag or a hub id, and its name."""

    id: str
    name: str | None = None


def fine_tune_path_var(model: str) -> str:
    """BENTOSERVICE_<MODEL>_FINE_TUNE_PATH, as OpenLLM's OPENLLM_<MODEL>_FINE_TUNE_PATH."""
    return f"BENTOSERVICE_{re.sub(r'[^A-Z0-9]+', '_', model.upper())}_FINE_TUNE_PATH"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BENTOSERVICE_", extra="ignore")

    model: str = "smollm2"
    """The base model served: a store name or a hub id that a card or the store knows."""
    data_dir: Path = Field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "bentoservice")
    # API keys (comma-separated in the environment; never logged: SecretStr prints as stars). With none set every
    # route is open. An admin key may call everything; an inference key only models, chat, completions,
    # embeddings, rerank and the chat templates' listing (api.guard). api_key is one more admin key.
    api_key: SecretStr | None = None
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = []
    inference_api_keys: Annotated[list[SecretStr], NoDecode] = []
    api_keys_file: Path | None = None
    """A file of `admin KEY` or `inference KEY` lines (blank lines and # comments skipped), read at start."""
    metrics_need_key: bool = False
    """Put /metrics behind a key (any key) too; /readyz and /livez are always open."""
    chat_template: str | None = None
    """A named template or a Jinja string that overrides the model card's and tokenizer's."""

    # Serving limits.
    max_request_bytes: int = 8 * 1024 * 1024
    max_running: int = 16
    max_queued: int = 256
    default_max_tokens: int = 1024
    max_choices: int = 8
    """The most completions one request may ask for (OpenAI's `n`); at most `max_running`."""
    max_output_tokens: int = 32768
    """The most tokens one request may ask for (`max_tokens`, `max_completion_tokens`); a prompt plus that many
    must still fit the model's context (a 400 that gives the numbers)."""
    prefill_token_budget: int | None = None
    """Prompt tokens one prefill pass takes before running sequences decode again; unset: 4096 on a GPU, 256 on
    a CPU, where a pass of many prompts takes seconds and early arrivals would wait for all of them."""
    prefix_cache_mb: int | None = None
    """Memory for keys and values of earlier prompts, reused by prompts that begin the same way; 0: off. Unset:
    128 on a CPU, where prefill is slow; off on a GPU, where it cost throughput (see docs/benchmarks.md)."""
    device: str = "auto"
    dtype: str = "auto"

    # Fine-tuning service.
    database_url: str | None = None
    """A SQLAlchemy URL for files, jobs, events and checkpoints; default SQLite (WAL) in data_dir."""
    max_file_bytes: int = 512 * 1024 * 1024
    job_concurrency: int = 1
    files_url: str | None = None
    """An fsspec URL (s3://bucket/prefix, gs://..., file:///shared) for uploads and jobs' results; default
    data_dir/files. Replicas and training nodes that share it (and database_url) share the fine-tuning service."""
    training_backend: Literal["local", "ray"] = "local"
    """Where jobs train unless their body says: processes on this machine, or the Ray cluster at ray_address."""
    ray_address: str | None = None
    """The Ray cluster's dashboard address for its Jobs API, e.g. http://head:8265."""
    ray_runtime_env: dict[str, Any] = {}
    """A Ray runtime_env (JSON) for training jobs: env_vars, pip, working_dir, ..."""

    # Adapters: the first loaded at start is the default.
    adapters: list[AdapterSpec] = []
    adapter_dirs: Annotated[list[Path], NoDecode] = []
    max_loras: int = 8
    """Adapters in the device's fixed slots; more are loaded on request, evicting the least recently used idle one."""
    max_cpu_loras: int = 32
    """Adapters kept in host memory (pinned on CUDA) beyond the slots, ready to copy into one."""
    adapter_source_url: str | None = None
    """An fsspec URL (file:///shared/adapters, s3://bucket/adapters) whose folders are adapters served on request."""
    adapter_wait_s: float = 30.0
    """How long a request waits for a slot while every slot holds an adapter in use, before a 429."""
    max_lora_rank: int = 64

    # Embedding and rerank models (store names or hub ids, comma-separated in the environment); the first of
    # each kind answers requests that name no model. Finished rerank and embedding jobs are served too.
    embedding_models: Annotated[list[str], NoDecode] = ["minilm"]
    rerank_models: Annotated[list[str], NoDecode] = []
    max_encoders: int = 8

    service_url: str | None = None
    """This service's /v1 as job runners reach it (graders that call served models); `bentoservice start` sets it
    to its own port on 127.0.0.1 unless given, e.g. for runners on a Ray cluster."""
    # Python graders (reinforcement fine-tuning): each grade's sandboxed process may use this much.
    grader_cpu_seconds: int = 10
    grader_memory_mb: int = 1024
    grader_timeout_s: float = 30.0

    @field_validator("adapter_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p]
        return value

    def _file_keys(self, role: str) -> list[str]:
        if self.api_keys_file is None:
            return []
        keys = []
        for number, line in enumerate(self.api_keys_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, key = line.partition(" ")
            if kind not in ("admin", "inference") or not key.strip():
                raise ValueError(f"{self.api_keys_file}:{number}: expected `admin KEY` or `inference KEY`")
            if kind == role:
                keys.append(key.strip())
        return keys

    def admin_keys(self) -> list[str]:
        single = [self.api_key.get_secret_value()] if self.api_key else []
        return single + [k.get_secret_value() for k in self.admin_api_keys] + self._file_keys("admin")

    def inference_keys(self) -> list[str]:
        return [k.get_secret_value() for k in self.inference_api_keys] + self._file_keys("inference")

    @field_validator("embedding_models", "rerank_models", "admin_api_keys", "inference_api_keys", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def fine_tune_root(self) -> Path:
        return cache_root() / "fine_tune"

    @property
    def choices_limit(self) -> int:
        """The most `n` a request may ask for: the request models' bound (so the OpenAPI document's maximum)."""
        return min(self.max_choices, self.max_running)

    def body_limit(self, path: str) -> tuple[int, str]:
        """The most bytes a request body to `path` may hold, and the setting that says so (uploads have their own):
        what api.guard enforces and the OpenAPI document states."""
        if path.endswith("/files"):
            return self.max_file_bytes, "BENTOSERVICE_MAX_FILE_BYTES"
        return self.max_request_bytes, "BENTOSERVICE_MAX_REQUEST_BYTES"


@lru_cache
def get_settings() -> Settings:
    return Settings()
