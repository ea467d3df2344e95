"""Training progress as events for a pluggable sink, and stopping a run from outside."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)


class Flag(Protocol):
    """threading.Event, multiprocessing.Event."""

    def is_set(self) -> bool: ...


Sink = Callable[[dict[str, Any]], None]
StopFlag = Flag | Callable[[], bool]
# Trainer log keys passed on as they are; tokens_per_second and eta_seconds are derived here.
LOG_KEYS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "epoch",
    "eval_loss",
    "eval_accuracy",
    "eval_mrr",
    "train_loss",
    "mean_token_accuracy",
    "eval_mean_token_accuracy",
    "reward",
    "reward_std",
    "eval_reward",
    "grader_errors",
)
# GRPO's mean reward of each reward function ("rewards/NAME/mean", "eval_rewards/NAME/mean").
REWARD_KEY = re.compile(r"(eval_)?rewards/.+/mean")


def log_sink(event: dict[str, Any]) -> None:
    """A sink for the CLI: one log line per event."""
    details = " ".join(f"{k}={_short(v)}" for k, v in event.items() if k != "type")
    log.info("%s %s", event["type"], details)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_set(stop: StopFlag) -> bool:
    return stop.is_set() if hasattr(stop, "is_set") else bool(stop())


class ProgressCallback(TrainerCallback):
    """Emits `metrics` events on every log and `checkpoint` events on every save; stops when `stop` is set.

    tokens_per_second counts non-padding tokens (the trainer's `num_input_tokens_seen` with
    include_num_input_tokens_seen="non_padding") between two logs.
    """

    def __init__(self, sink: Sink | None = None, stop: StopFlag | None = None) -> None:
        self.sink = sink or (lambda event: None)
        self.stop = stop
        self.stopped = False
        self.last_metrics: dict[str, Any] = {}
        self._start = self._mark = time.monotonic()
        self._first_step = self._mark_tokens = self._metrics_step = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = self._mark = time.monotonic()
        self._first_step = state.global_step
        self._mark_tokens = state.num_input_tokens_seen

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stop is not None and _is_set(self.stop):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # a checkpoint to resume from

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        event: dict[str, Any] = {"type": "metrics", "step": state.global_step}
        event.update({k: v for k, v in logs.items() if k in LOG_KEYS or REWARD_KEY.fullmatch(k)})
        now = time.monotonic()
        if state.num_input_tokens_seen > self._mark_tokens and now > self._mark:
            event["tokens_per_second"] = (state.num_input_tokens_seen - self._mark_tokens) / (now - self._mark)
        if state.max_steps > 0:
            event["total_steps"] = state.max_steps  # what a progress bar counts to (epochs resolved to steps)
        done = state.global_step - self._first_step
        if done > 0 and state.max_steps > 0:
            event["eta_seconds"] = (now - self._start) / done * (state.max_steps - state.global_step)
        self._mark, self._mark_tokens = now, state.num_input_tokens_seen
        # A step's training log and its evaluation are two logs: a checkpoint of that step carries both.
        if state.global_step != self._metrics_step:
            self.last_metrics, self._metrics_step = {}, state.global_step
        self.last_metrics.update({k: v for k, v in event.items() if k not in ("type", "step", "total_steps")})
        self.sink(event)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.sink({"type": "checkpoint", "step": state.global_step, "path": str(path), "metrics": self.last_metrics})
