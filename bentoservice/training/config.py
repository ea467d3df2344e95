"""TrainingConfig: every knob of a fine-tune in one pydantic model (YAML file, job body or Python API)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bentoservice.config import get_settings
from bentoservice.training.methods.evaluation import Evaluation

Method = Literal["sft", "dpo", "orpo", "grpo"]
AdapterType = Literal["lora", "qlora"]

# The TRL config class of each method, imported only when needed (importing trl takes seconds).
TRL_CONFIGS: dict[str, str] = {
    "sft": "trl:SFTConfig",
    "dpo": "trl:DPOConfig",
    "orpo": "trl.experimental.orpo:ORPOConfig",
    "grpo": "trl:GRPOConfig",
}
# TRL's defaults suit full fine-tunes (DPO/ORPO: 1e-6); a LoRA adapter needs a larger step to learn anything.
LORA_LEARNING_RATE: dict[str, float] = {"sft": 2e-4, "dpo": 5e-5, "orpo": 5e-5, "grpo": 1e-4}
# Familiar names: transformers 5 folded warmup_ratio into warmup_steps (below 1 it is a fraction of the steps).
ARG_ALIASES = {"epochs": "num_train_epochs", "warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy"}
# Knobs that are fields of TrainingConfig itself and must not be repeated in `args`.
OWN_KNOBS = {"max_length": "max_seq_length", "beta": "beta", "loss_type": "loss_type", "packing": "packing"}
# A BentoML tag name.
TAG_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class TrainingError(ValueError):
    """A fine-tune that cannot run as configured; the message is one line for the user."""


def trl_config_class(method: str) -> type:
    module, name = TRL_CONFIGS[method].split(":")
    return getattr(importlib.import_module(module), name)


@lru_cache
def known_args(method: str) -> frozenset[str]:
    """The names `args` may hold for `method`: TrainingArguments fields and the TRL config's own."""
    try:
        config_class = trl_config_class(method)
    except ImportError:  # the Gaudi stack (transformers 4.55) has no trl 1.x: plain TrainingArguments there
        from transformers import TrainingArguments

        config_class = TrainingArguments
    return frozenset(f.name for f in dataclasses.fields(config_class) if f.init)


class FineTuneChecks(BaseModel):
    """Checks every fine-tune config shares: `adapter_name` is a store name, `args` take familiar aliases."""

    @field_validator("args", check_fields=False)
    @classmethod
    def _resolve_aliases(cls, args: dict[str, Any]) -> dict[str, Any]:
        return {ARG_ALIASES.get(k, k): v for k, v in args.items()}

    @field_validator("adapter_name", check_fields=False)
    @classmethod
    def _tag_name(cls, name: str | None) -> str | None:
        if name is not None and not TAG_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid store name (lowercase letters, digits, '_', '-', '.')")
        return name


class TrainingConfig(FineTuneChecks):
    """A fine-tune. Unknown top-level keys that are training arguments (e.g. `epochs`, `learning_rate`) move into
    `args`, which passes everything else through to the TRL config (a `transformers.TrainingArguments`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default_factory=lambda: get_settings().model)
    """Base model: store name or hub id."""
    model_id: str | None = None
    method: Method = "sft"
    train_file: Path | None = None
    test_file: Path | None = None
    adapter_name: str | None = None
    """Store name of the finished adapter; default `<base>-<method>-<version>`."""

    adapter_type: AdapterType = "lora"
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """0 as in peft and OpenWeights: dropout's random masks cost about a fifth of a CPU step and, on a GPU,
    memory for a copy of every LoRA layer's input."""
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"

    beta: float = Field(0.1, gt=0)
    """DPO's KL weight, ORPO's odds-ratio weight."""
    loss_type: str | list[str] | None = None
    """DPO loss (sigmoid, ipo, hinge, ...) or SFT loss (nll, dft); TRL's default when unset."""
    packing: bool = False
    max_seq_length: int = Field(2048, gt=0)
    grader: dict[str, Any] | None = None
    """grpo (reinforcement fine-tuning): the grader that scores each sampled completion, as OpenAI's API has it
    (training.graders)."""
    evaluation: Evaluation | None = None
    """Compare the base and the adapter at the end (held-out loss, sample generations); `prompts_file` is a path."""
    args: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect_args(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields)
        extra = {k: v for k, v in data.items() if k not in own}
        if not extra:
            return data
        return {**{k: v for k, v in data.items() if k in own}, "args": {**extra, **(data.get("args") or {})}}

    @model_validator(mode="after")
    def _check_args(self) -> TrainingConfig:
        for key, field in OWN_KNOBS.items():
            if key in self.args:
                raise ValueError(f"set {field!r} at the top level, not in args")
        if self.method == "orpo" and self.loss_type is not None:
            raise ValueError("orpo has no loss_type")
        if (self.method == "grpo") != (self.grader is not None):
            raise ValueError("a grader is for grpo, and grpo needs one")
        unknown = sorted(set(self.args) - known_args(self.method)) if self.args else []
        if unknown:
            raise ValueError(f"unknown training argument(s) for {self.method}: {', '.join(unknown)}")
        return self

    def trainer_args(self) -> dict[str, Any]:
        """`args` with this product's defaults filled in, plus the method's own knobs."""
        defaults: dict[str, Any] = {
            "learning_rate": LORA_LEARNING_RATE[self.method],
            "report_to": "none",
            "save_total_limit": 3,
            "include_num_input_tokens_seen": "non_padding",
        }
        if self.method == "orpo":
            # ORPO's collator reads its own columns, and its batches have no input_ids to count.
            defaults.update(remove_unused_columns=False, include_num_input_tokens_seen="no")
        own: dict[str, Any] = {"max_length": self.max_seq_length}
        if self.method == "sft":
            own["packing"] = self.packing
        elif self.method == "grpo":
            # GRPO's beta is a KL weight against a reference model, 0 (none kept) unless asked for.
            own = {"beta": self.beta} if "beta" in self.model_fields_set else {}
            defaults["include_num_input_tokens_seen"] = "no"  # GRPOTrainer counts its prompts and completions
        else:
            own["beta"] = self.beta
        if self.loss_type is not None:
            own["loss_type"] = self.loss_type
        return {**defaults, **self.args, **own}
