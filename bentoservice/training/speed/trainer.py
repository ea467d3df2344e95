"""The SFT trainer of the fast path: a subclass of TRL's SFTTrainer.

It overrides Trainer internals (`training_step`, `compute_loss`, `_track_num_input_tokens`, `log`,
`floating_point_ops`, `evaluation_loop`) so that a step waits for the GPU only at its start and when it logs;
an upgrade of transformers or TRL (pinned exactly in pyproject.toml) must re-check them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any

from bentoservice.training.data.labels import IGNORE
from bentoservice.training.speed.passes import LABELLED, split_passes, with_labelled_counts
from bentoservice.training.speed.plan import MemoryPlan, checkpoint_layers, decoder_layers

if TYPE_CHECKING:
    import torch
    from trl import SFTTrainer

log = logging.getLogger(__name__)


@cache
def sft_trainer_class() -> type[SFTTrainer]:
    """SFTTrainer, whose loss on padding-free batches can come from the labelled positions' logits alone, and whose
    steps wait for the GPU only at their start and when they log."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class FastSFTTrainer(SFTTrainer):
        labelled_logits = False
        head: torch.nn.Linear | None = None
        """The LM head, when the loss of padding-free training passes is fused_loss.py's."""
        memory: MemoryPlan | None = None
        layers: list[torch.nn.Module] = []
        pass_tokens: int | None = None
        pass_granularity = 1
        """Passes are padded to multiples of this (graphs.py's buckets): batches are split to pad them least."""
        counted_parameters: int | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Trainer checks each step's loss for inf/NaN on the host, which waits for the GPU before every optimizer
            # step; training_step applies the same filter on the device.
            self.nan_inf_filter, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False

        def fit_memory(self, plan: MemoryPlan, largest_batch: int) -> int:
            """Train each batch in passes of up to `plan.pass_tokens` tokens, and checkpoint, pass by pass, the
            layers that `plan` says the pass needs (`largest_batch`: the most tokens a batch can hold); the most
            layers a pass will checkpoint."""
            largest = plan.largest_pass(largest_batch)
            most = plan.checkpointed(largest)
            log.info(
                "passes of up to %d tokens, checkpointing at most %d of %d layers (batches of up to %d "
                "tokens, %.1f GiB free)",
                largest,
                most,
                plan.layers,
                largest_batch,
                plan.budget / 0.75 / 2**30,
            )
            if largest < largest_batch:
                self.pass_tokens = plan.pass_tokens
            if most:
                self.memory, self.layers = plan, decoder_layers(self.model)
                self.model.activation_checkpointing_enable({"use_reentrant": False})
                checkpoint_layers(self.layers, 0)
            return most

        def training_step(
            self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
        ) -> torch.Tensor:
            passes = [inputs]
            if self.pass_tokens and num_items_in_batch is not None and "cu_seq_lens_q" in inputs:
                passes = split_passes(inputs, self.pass_tokens, self.pass_granularity)
            if self.head is not None and "cu_seq_lens_q" in inputs:
                passes = with_labelled_counts(inputs, passes)
            loss = None
            with training_mode(model):
                for i, part in enumerate(passes):
                    # The loss is normalised by the whole batch's count, so the passes' gradients add up to the
                    # batch's; data-parallel ranks exchange them once, after the last pass.
                    sync = contextlib.nullcontext() if i == len(passes) - 1 else self.accelerator.no_sync(model)
                    with sync:
                        part_loss = super().training_step(model, part, num_items_in_batch)
                    loss = part_loss if loss is None else loss + part_loss
            assert loss is not None  # passes holds at least the whole batch
            if self.nan_inf_filter:
                # Trainer's filter: an inf or NaN step counts as the mean of the steps since the last log.
                steps = 1 + self.state.global_step - self._globalstep_last_logged
                loss = torch.where(loss.isfinite(), loss, self._tr_loss / steps)
            return loss

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            # Evaluation's loss leaves out inf/NaN batches by the same setting.
            self.args.logging_nan_inf_filter = self.nan_inf_filter
            try:
                return super().evaluation_loop(*args, **kwargs)
            finally:
                self.args.logging_nan_inf_filter = False

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            # Trainer's counts the model's parameters again for every batch (its running FLOP total): milliseconds of
            # host time a step, with the GPU idle.
            if self.counted_parameters is None:
                self.counted_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self.counted_parameters if "input_ids" in inputs else 0

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            # Trainer counts the non-padding tokens on the device and reads the count back, waiting for the GPU every
            # step; a padding-free batch has no padding.
            if (
                self.args.include_num_input_tokens_seen != "no"
                and "cu_seq_lens_q" in inputs
                and self.accelerator.num_processes == 1
            ):
                self.state.num_input_tokens_seen += inputs["input_ids"].numel()
            else:
                super()._track_num_input_tokens(inputs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            for values in self._metrics["train"].values():
                read_back(values)
            super().log(logs, start_time)

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            labelled = inputs.pop(LABELLED, None)
            if self.memory is not None and model.training:
                checkpoint_layers(self.layers, self.memory.checkpointed(inputs["input_ids"].numel()))
            labels = inputs.get("labels")
            plain = self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
            if not (
                plain
                and not self.aux_loss_enabled
                and not return_outputs
                and labels is not None
                and labels.shape[0] == 1
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if labelled is not None and model.training:
                return self.fused_loss(inputs, labelled, num_items_in_batch)
            if not self.labelled_logits:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = labels[0, 1:]
            keep = (targets != IGNORE).nonzero().squeeze(-1)
            batch = {k: v for k, v in inputs.items() if k != "labels"}
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits[0]
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
            # TRL's token accuracy (OpenAI's train/valid_mean_token_accuracy); a training step's stays on the device.
            accuracy = (logits.argmax(-1) == targets[keep]).sum().detach() / max(keep.numel(), 1)
            self._metrics["train" if model.training else "eval"]["mean_token_accuracy"].append(
                accuracy if model.training else accuracy.item()
            )
            count = keep.numel() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As Trainer and TRL do: the count holds every rank's tokens, and DDP averages the ranks' gradients.
                loss = loss * self.accelerator.num_processes
            return loss

        def fused_loss(
            self, inputs: dict[str, Any], labelled: int, num_items_in_batch: torch.Tensor | int | None
        ) -> torch.Tensor:
            """TRL's loss and metrics for one process's padding-free training pass, of which `labelled` positions
            predict a labelled token, through fused_loss.py."""
            from bentoservice.training.speed.fused_loss import labelled_loss

            decoder = self.model.get_base_model().base_model
            hidden = decoder(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            divisor = labelled if num_items_in_batch is None else num_items_in_batch
            loss, entropy, top1 = labelled_loss(
                hidden.last_hidden_state[0], inputs["labels"][0], labelled, self.head, divisor
            )
            # TRL's metrics, kept on the device until they are logged.
            metrics, count = self._metrics["train"], max(labelled, 1)
            metrics["entropy"].append(entropy / count)
            metrics["mean_token_accuracy"].append(top1 / count)
            self._total_train_tokens += inputs["position_ids"].shape[1]
            metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    return FastSFTTrainer


def read_back(values: list[Any]) -> None:
    """Replace the device tensors among `values` (a metric's values) with their numbers, read back at once."""
    import torch

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        numbers = iter(torch.stack(tensors).tolist())
        values[:] = [next(numbers) if isinstance(v, torch.Tensor) else v for v in values]


@contextlib.contextmanager
def training_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trainer's training step puts the model in training mode each time, a walk over its thousands of modules (about
    14 ms of host time on the H100 machine for the 8B shape, with the GPU idle at the start of a step): done here
    only when the model is not in it already, and skipped within."""
    if not model.training:
        model.train()
    model.train = lambda mode=True: model if mode else type(model).train(model, mode)
    try:
        yield
    finally:
        del model.train
