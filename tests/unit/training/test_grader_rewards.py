"""GRPO's reward functions from a grader (training.methods.rl.GraderRewards): a failed grade scores 0 and is
counted, a batch whose every grade fails stops the run with the grader's reason."""

from __future__ import annotations

import json
import math

import pytest

from bentoservice.training.config import TrainingError
from bentoservice.training.graders import GradeResult, GradingFailed
from bentoservice.training.methods.rl import GraderRewards


def grade(text: str, item: dict) -> GradeResult:
    if item["fail"]:
        raise GradingFailed("the python grader raised: Traceback (most recent call last):\n  ...\nValueError: bad", "x")
    return GradeResult(1.0, {"a": 0.5})


def rewards_of(rewards: GraderRewards, fails: list[bool]) -> list[list[float]]:
    items = [json.dumps({"fail": fail}) for fail in fails]
    completions = [[{"role": "assistant", "content": "hi"}]] * len(fails)
    return [f(prompts=[None] * len(fails), completions=completions, item=items) for f in rewards.functions]


def test_a_failed_grade_scores_0_and_counts() -> None:
    rewards = GraderRewards(grade, "multi", ["a"])
    score, sub = rewards_of(rewards, [False, True, False])
    assert score == [1.0, 0.0, 1.0] and rewards.errors == 1
    assert sub[0] == sub[2] == 0.5 and math.isnan(sub[1])  # TRL's per-grader mean leaves the failed sample out
    rewards_of(rewards, [True, False])
    assert rewards.errors == 2  # until the next log takes them (GraderErrors)


def test_a_batch_whose_every_grade_fails_stops_the_run() -> None:
    rewards = GraderRewards(grade, "py", [])
    with pytest.raises(TrainingError, match=r"failed on all 2 samples of a batch: the python grader raised: .* bad$"):
        rewards_of(rewards, [True, True])
