"""A job's numbers under OpenAI's names: the metrics of its events and checkpoints, and the step-metrics CSV
stored as its result file (purpose `fine-tune-results`)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from typing import Any

# The trainer's log keys and OpenAI's names for them (the trainer's stay beside them for older clients).
OPENAI_NAMES = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
    "reward": "train_reward_mean",
    "eval_reward": "valid_reward_mean",
}
# A grader's mean score (GRPO's "rewards/NAME/mean"): train_grader_NAME_mean, valid_grader_NAME_mean.
GRADER_KEY = re.compile(r"(?P<eval>eval_)?rewards/(?P<name>.+)/mean")
# The final evaluation on the whole validation file.
FULL_VALID_NAMES = {
    "eval_loss": "full_valid_loss",
    "eval_mean_token_accuracy": "full_valid_mean_token_accuracy",
    "eval_reward": "full_valid_reward_mean",
}
# The columns of OpenAI's step_metrics.csv (train_accuracy is the mean token accuracy of the step's batch).
CSV_COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
}


def with_openai_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` plus OpenAI's name of each trainer key it has. Trainer's end-of-training summary also calls
    its mean loss `train_loss`; a per-step `loss` wins over it."""
    named = {OPENAI_NAMES[k]: v for k, v in metrics.items() if k in OPENAI_NAMES}
    for key, value in metrics.items():
        if match := GRADER_KEY.fullmatch(key):
            named[f"{'valid' if match['eval'] else 'train'}_grader_{match['name']}_mean"] = value
    return {**metrics, **named}


def full_validation(metrics: dict[str, Any]) -> dict[str, float]:
    """OpenAI's full_valid_* figures from the trainer's final evaluation metrics."""
    return {name: metrics[key] for key, name in FULL_VALID_NAMES.items() if key in metrics}


# A reinforcement job's columns after those: the rewards, then each grader's mean (train_grader_NAME_mean, ...).
REWARD_COLUMNS = ("train_reward_mean", "valid_reward_mean", "grader_errors")
GRADER_COLUMN = re.compile(r"(train|valid)_grader_.+_mean")


def step_metrics_csv(events: Iterable[dict[str, Any]]) -> tuple[bytes, int]:
    """The CSV of a job's metrics events (oldest first), one row a step, and how many rows. A step logged twice
    (a resumed job repeats the steps after its checkpoint) keeps its latest values."""
    rows: dict[int, dict[str, Any]] = {}
    graders: set[str] = set()
    for data in events:
        if "step" not in data or not ({"loss", "eval_loss", "reward", "eval_reward"} & set(data)):
            continue
        named = with_openai_names(data)
        row = rows.setdefault(int(data["step"]), {})
        row.update({column: named[key] for column, key in CSV_COLUMNS.items() if key in named})
        row.update({key: named[key] for key in REWARD_COLUMNS if key in named})
        row.update({key: value for key, value in named.items() if GRADER_COLUMN.fullmatch(key)})
        graders.update(key for key in named if GRADER_COLUMN.fullmatch(key))
    rewards = any("train_reward_mean" in row or "valid_reward_mean" in row for row in rows.values())
    columns = list(CSV_COLUMNS) + ([*REWARD_COLUMNS, *sorted(graders)] if rewards else [])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[step] for step in sorted(rows))
    return out.getvalue().encode(), len(rows)
