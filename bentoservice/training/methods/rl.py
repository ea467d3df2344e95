"""Reinforcement fine-tuning (OpenAI's method type "reinforcement"): TRL's GRPOTrainer trains a LoRA adapter on
chat prompts, each sampled completion scored by the job's grader (training.graders).

Rollouts come from TRL's own generation (`model.generate` on the model being trained), not from the serving
engine: the engine lives in the server's process with its own copy of the weights, and TRL's `rollout_func` would
need the adapter's weights copied into an engine slot every step and the engine's per-token logprobs back.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from bentoservice.training import hardware
from bentoservice.training.config import TrainingConfig, TrainingError
from bentoservice.training.data import formats
from bentoservice.training.graders import GradeResult, GradingFailed, ServiceModels, build_grader, sample_of
from bentoservice.training.graders.multi import MultiGrader
from bentoservice.training.jobs.callbacks import Sink, StopFlag
from bentoservice.training.methods import runs, trainers

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

# A grader's score of each completion (a completion's text, the item it answers).
Grade = Callable[[str, dict[str, Any]], GradeResult]


def _text(completion: Any) -> str:
    """A completion's text: TRL passes chat prompts' completions as a list of assistant messages."""
    if isinstance(completion, list):
        return "".join(message.get("content") or "" for message in completion)
    return str(completion)


class GraderRewards:
    """TRL reward functions from one grader: the grader's score (weight 1), then each named sub-grader's score
    (weight 0: logged as `rewards/NAME/mean`, not trained on). The sub-graders read what the score just computed.

    A sample whose grade fails (GradingFailed: a python grader raising, a score model's unparsable reply) scores 0,
    as OpenAI's graders/run scores it, and counts in `errors` (the `grader_errors` of the next log); a batch whose
    every grade fails stops the run: that grader cannot teach anything."""

    def __init__(self, grade: Grade, name: str, sub_graders: list[str]) -> None:
        self.grade, self.last, self.errors = grade, [GradeResult(0.0)], 0
        self.functions = [self._named(name, self._score)] + [self._named(sub, self._sub(sub)) for sub in sub_graders]
        self.weights = [1.0] + [0.0] * len(sub_graders)

    @staticmethod
    def _named(name: str, function: Callable[..., list[float]]) -> Callable[..., list[float]]:
        def reward(*args: Any, **kwargs: Any) -> list[float]:
            return function(*args, **kwargs)

        reward.__name__ = name  # TRL logs each reward function under its __name__
        return reward

    def _score(self, prompts: list[Any], completions: list[Any], item: list[str], **kwargs: Any) -> list[float]:
        self.last, failures = [], list[GradingFailed]()
        for completion, line in zip(completions, item, strict=True):
            try:
                self.last.append(self.grade(_text(completion), json.loads(line)))
            except GradingFailed as exc:
                failures.append(exc)
                self.last.append(GradeResult(0.0))  # no sub-scores: each sub-grader's mean leaves it out
        if failures and len(failures) == len(self.last):
            lines = failures[0].message.strip().splitlines()  # a python grader's ends with its exception's line
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            raise TrainingError(f"the grader failed on all {len(failures)} samples of a batch: {reason}")
        if failures:
            log.warning(
                "the grader failed on %d of %d samples, scored 0: %s", len(failures), len(self.last), failures[0]
            )
        self.errors += len(failures)
        return [s.score for s in self.last]

    def _sub(self, name: str) -> Callable[..., list[float]]:
        return lambda prompts, completions, **kwargs: [s.sub_scores.get(name, math.nan) for s in self.last]


class GraderErrors(TrainerCallback):
    """Puts the failed grades since the last log into each log (train and eval) as `grader_errors`; it must come
    before the callback that reports the logs."""

    def __init__(self, rewards: GraderRewards) -> None:
        self.rewards = rewards

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is not None:
            logs["grader_errors"], self.rewards.errors = self.rewards.errors, 0


def grader_rewards(spec: dict[str, Any]) -> GraderRewards:
    """The job's grader (OpenAI's grader object) as TRL reward functions."""
    grader = build_grader(spec, ServiceModels.from_settings())

    def grade(text: str, item: dict[str, Any]) -> GradeResult:
        return grader.grade(sample_of(text), item)

    # The built grader's names (a multi grader's `graders` may be one grader object, not a dict of them).
    subs = list(grader.graders) if isinstance(grader, MultiGrader) else []
    return GraderRewards(grade, grader.name, subs)


def hf_dataset(data: formats.Dataset) -> datasets.Dataset:
    """Prompt rows for GRPOTrainer; each item as JSON text (items differ in their fields, an Arrow column not)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": row["prompt"], "item": json.dumps(row["item"])} for row in data.rows])


def run_reinforcement(
    config: TrainingConfig,
    sink: Sink | None = None,
    stop: StopFlag | None = None,
    resume: bool = False,
    rewards: GraderRewards | None = None,
) -> runs.TrainingResult:
    """Train `config.train_file`'s prompts against `config.grader` (or `rewards`), rewarded on
    `config.test_file`'s prompts at each evaluation; store the adapter. As trainers.train_on for the rest."""
    from trl import GRPOConfig, GRPOTrainer

    if config.train_file is None:
        raise TrainingError("train_file is required")
    if hardware.detect_device() == "hpu":
        raise TrainingError("reinforcement fine-tuning is not supported on Intel Gaudi")
    train = formats.load_file(config.train_file, expect="prompts")
    test = formats.load_file(config.test_file, expect="prompts") if config.test_file else None
    assert config.grader is not None or rewards is not None  # TrainingConfig requires a grader for grpo
    rewards = rewards or grader_rewards(config.grader or {})
    run = trainers.prepare_run(config, [train] if test is None else [train, test], sink, stop, resume)
    log.info("reinforcement fine-tuning %s on %s into %s", run.base.name, run.device, run.output_dir)
    trainer = GRPOTrainer(
        model=hardware.load_model(run.base.path, run.device, config.adapter_type),
        reward_funcs=rewards.functions,
        args=GRPOConfig(**run.args, reward_weights=rewards.weights),
        train_dataset=hf_dataset(train),
        eval_dataset=hf_dataset(test) if test is not None else None,
        processing_class=run.tokenizer,
        peft_config=trainers.lora_config(config),
        callbacks=[GraderErrors(rewards), run.progress],
    )
    if test is not None and run.checkpoint is None:
        trainer.evaluate()  # the base's held-out reward (a fresh LoRA adapter changes nothing): step 0's event
    metrics = runs.train_and_evaluate(trainer, run.checkpoint, run.progress, evaluate=test is not None)
    return runs.finish_run(config, run, trainer, metrics)
