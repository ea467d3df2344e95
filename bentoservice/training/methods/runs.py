"""What every LLM fine-tune does around its trainer, whatever the method (trainers.py: SFT, DPO, ORPO; rl.py:
reinforcement; encoders.py for the checkpoint and naming parts): train, evaluate, save and store the adapter."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bentoservice.training.config import TrainingConfig, TrainingError
from bentoservice.training.jobs.callbacks import ProgressCallback

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

    from bentoservice import store
    from bentoservice.training import hardware

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    adapter_path: Path | None
    """The finished adapter folder; None when the run was stopped."""
    tag: str | None
    """The adapter's store tag; None when the run was stopped."""
    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: Path | None = None
    stopped: bool = False
    evaluation: dict[str, Any] | None = None
    """The before/after comparison (methods.evaluation), when the config asked for one."""


@dataclass
class Run:
    """What a fine-tune of any LLM method sets up before its trainer: the base, the device, the arguments."""

    base: store.StoredModel
    device: hardware.Device
    tokenizer: PreTrainedTokenizerBase
    output_dir: Path
    args: dict[str, Any]
    checkpoint: str | None
    progress: ProgressCallback


def finish_run(
    config: TrainingConfig,
    run: Run,
    trainer: Trainer,
    metrics: dict[str, float],
    compare: Callable[[], dict[str, Any] | None] = lambda: None,
) -> TrainingResult:
    """Save the trained adapter and store it (`compare` evaluates it first), unless a stop request ended the run."""
    from bentoservice import store

    if run.progress.stopped:
        return TrainingResult(None, None, metrics, run.output_dir, stopped=True)
    trainer.save_model(str(run.output_dir))  # every process of a distributed run takes part (FSDP gathers them)
    if not trainer.is_world_process_zero():
        return TrainingResult(None, None, metrics, run.output_dir)
    refuse_diverged(trainer.model)
    run.tokenizer.save_pretrained(run.output_dir)
    compared = compare()
    stored = store.save_adapter(
        config.adapter_name or default_adapter_name(run.base.name, config.method, run.output_dir),
        run.output_dir,
        run.base.name,
        adapter_metadata(config, run.args, metrics),
    )
    log.info("saved adapter %s (%s)", stored.tag, run.output_dir)
    return TrainingResult(run.output_dir, stored.tag, metrics, run.output_dir, evaluation=compared)


def refuse_diverged(model: Any) -> None:
    """A diverged run (loss NaN) leaves NaN or inf in the trained weights: never publish those (seen on a GPU with
    a random bf16 base: served beside other adapters, such an adapter's NaN reached every row of the batch)."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(
            f"training diverged: {len(bad)} trained tensors hold NaN or inf (first: {bad[0]}); "
            "lower the learning rate (learning_rate_multiplier) or check the data"
        )


def train_and_evaluate(
    trainer: Trainer, checkpoint: str | None, progress: ProgressCallback, evaluate: bool
) -> dict[str, float]:
    """Train (from `checkpoint` when given), then evaluate unless a stop request ended training early."""
    metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    if trainer.state.global_step == 0 and not progress.stopped:  # an untrained adapter is never published
        raise TrainingError(
            "training ran 0 optimizer steps: the data is smaller than one step (batch size x "
            "gradient accumulation) or max_steps/epochs allow none"
        )
    if progress.stopped:
        log.info("stopped at step %d; resume from %s", trainer.state.global_step, trainer.args.output_dir)
    elif evaluate:
        metrics.update(trainer.evaluate())
    return metrics


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint in `output_dir`. Trainer writes `trainer_state.json` last, so a checkpoint
    without it was cut short (the process killed while saving it) and cannot be resumed from."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = [
        int(path.name.removeprefix(prefix))
        for path in output_dir.glob(f"{prefix}*")
        if path.name.removeprefix(prefix).isdigit() and (path / TRAINER_STATE_NAME).is_file()
    ]
    return str(output_dir / f"{prefix}{max(steps)}") if steps else None


def default_adapter_name(base: str, method: str, output_dir: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", f"{base}-{method}-{output_dir.name}".lower())
    return name[:63].strip("-._")


def adapter_metadata(config: TrainingConfig, args: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    lora = config.model_dump(include={"adapter_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias"})
    metadata = {"method": config.method, "lora": lora, "training": args, "metrics": metrics}
    # Store metadata must be plain JSON values.
    return json.loads(json.dumps(metadata, default=str))
