"""The fast SFT path: padding-free batches, attention within each example, fused kernels where they pay.

A padding-free batch concatenates its examples into one row: `position_ids` restart at 0 for each example, and
TRL's collator adds `cu_seq_lens_q/k` (where each example starts) and `max_length_q/k`. The attention registered
here as VARLEN attends within each example only: flash attention's varlen kernel on CUDA
(`torch.nn.attention.varlen`), one causal SDPA call per example elsewhere. Nothing is spent on padding and no
`(tokens x tokens)` mask is built. Inputs with a padding mask or a KV cache fall back to plain SDPA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import logging
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from bentoservice.training.hardware import Device

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from trl import SFTTrainer

log = logging.getLogger(__name__)

VARLEN = "bentoservice_varlen"
IGNORE = -100  # the label that leaves a token out of the loss
# The key under which a training pass carries how many of its positions predict a labelled token (a number the host
# knows, so that the loss needs nothing read back from the GPU).
LABELLED = "bentoservice_labelled"
# Compiling the decoder layers took 73 to 102 s on an H100, then saved 10 to 15 us a token (Llama-3.2-1B shape,
# 8 chats a batch; docs/benchmarks.md): it pays from about ten million trained tokens.
COMPILE_FROM_TOKENS = 10_000_000
# With graphed passes, a pass holds about this much work (forward FLOPs, 2 x parameters x tokens), or the longest
# example: enough to keep the GPU busy (Llama-3-8B shape on the H100: 2,048 tokens a pass, 38% MFU in 24 GiB against
# 41 GiB in one pass; docs/benchmarks.md), so the passes of larger models take fewer tokens and less memory.
GRAPHED_PASS_FLOPS = 32e12


@dataclass(frozen=True)
class Speedups:
    """What the SFT trainer does to go fast; `defaults` picks them, the benchmark switches them one by one."""

    padding_free: bool = True
    """Concatenate each batch's examples into one row, attended with VARLEN (no padding, no mask)."""
    liger: bool = False
    """Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (TRL's fused LM head already covers the loss)."""
    compile: bool = False
    """torch.compile each decoder layer (one compiled graph shared by all layers, dynamic token counts), instead of
    Liger (Dynamo cannot trace Liger's kernels) and only where no batch needs checkpointed layers (Inductor fails
    on them)."""
    labelled_logits: bool = False
    """Project through the LM head only the positions that predict a trained token, with plain cross-entropy.
    TRL's fused LM head does so with Triton on CUDA, but scores every position elsewhere, and recomputes them."""
    fused_lora: bool = True
    """Each PEFT LoRA linear layer as one autograd function (fused_lora.py): fewer kernels and less host work."""
    passes: bool = True
    """Train a batch that would not fit in memory in several passes rather than checkpointing layers
    (MemoryPlan.pass_tokens)."""
    graphs: bool = False
    """Replay each padding-free pass as CUDA graphs (graphs.py), in passes of about GRAPHED_PASS_FLOPS: with the
    host's launches gone, small passes keep the GPU as busy as large ones, with less memory."""
    loader_workers: int = 0
    """Processes that fetch and collate the next batches while the device trains (Trainer's dataloader_num_workers):
    each step starts with its batch ready rather than waiting for it with the GPU idle (on the H100 machine the
    Llama-3.2-1B shape trained 4% more tokens a second, the 8B 2%)."""
    fused_loss: bool = False
    """The LM head and the loss of a padding-free pass as one function that computes the hidden states' gradient in
    the forward pass (fused_loss.py): no logits computed twice, and the pass reads nothing back from the GPU (TRL's
    loss reads its metrics back each pass)."""


def defaults(device: Device, planned_tokens: int) -> Speedups:
    """What pays on `device` for a run of about `planned_tokens` trained tokens."""
    if device != "cuda":
        # Liger and Inductor's kernels are Triton (GPU) kernels.
        return Speedups(labelled_logits=True)
    return Speedups(liger=importlib.util.find_spec("liger_kernel") is not None,
                    compile=planned_tokens >= COMPILE_FROM_TOKENS, graphs=True, fused_loss=True,
                    loader_workers=2)


def planned_tokens(lengths: list[int], args: dict[str, Any]) -> int:
    """About how many tokens a run of the SFT config's `args` trains on."""
    batch = int(args.get("per_device_train_batch_size", 8)) * int(args.get("gradient_accumulation_steps", 1))
    steps = int(args.get("max_steps", -1))
    if steps <= 0:
        steps = math.ceil(len(lengths) / batch * float(args.get("num_train_epochs", 3)))
    return int(steps * batch * statistics.fmean(lengths))


def sft_args(args: dict[str, Any], speedups: Speedups, packing: bool) -> dict[str, Any]:
    """The SFT config's arguments for `speedups`."""
    args = dict(args)
    if speedups.padding_free and not packing:
        # Lengths were checked against max_seq_length before the model loaded: nothing is left to truncate.
        args.update(padding_free=True, max_length=None)
        if speedups.passes and not {"gradient_checkpointing", "activation_checkpointing"} & set(args):
            # The trainer splits a step's examples into passes by tokens (MemoryPlan.pass_tokens), not by count:
            # one batch of all of them, the same examples per optimizer step and the same gradients. (Where the
            # user chose checkpointing, no memory plan is made, so the steps stay as the user set them.)
            accumulate = int(args.pop("gradient_accumulation_steps", 1))
            args["per_device_train_batch_size"] = int(args.get("per_device_train_batch_size", 8)) * accumulate
    if speedups.loader_workers:
        args.setdefault("dataloader_num_workers", speedups.loader_workers)
        if args["dataloader_num_workers"]:
            args.setdefault("dataloader_persistent_workers", True)
    # TRL checkpoints every layer by default, which recomputes the whole forward pass (a third more compute);
    # the trainer checkpoints only the layers that each batch needs for memory (`memory_plan`), unless the user
    # chose.
    args.setdefault("gradient_checkpointing", False)
    return args


@dataclass(frozen=True)
class MemoryPlan:
    """How many decoder layers a batch needs checkpointed (their activations recomputed in the backward pass)
    for what the others keep to fit in memory: none for most batches, some for the largest."""

    keep_per_token: int
    """Bytes one decoder layer keeps per token for the backward pass."""
    input_per_token: int
    """Bytes it keeps when checkpointed: its input."""
    layers: int
    budget: int
    """Bytes free for activations."""
    pass_tokens: int = 2**62
    """The most tokens one forward pass takes: a batch of more is trained in several passes of about equal size,
    split between examples, whose gradients add up to the whole batch's. This is what fits in memory without
    checkpointing: a pass recomputes nothing and Inductor can compile its layers (it fails on checkpointed ones),
    while each extra pass costs its launch overhead. Eager passes smaller than that would save memory but, on the
    H100 machine, are bound by the host's kernel launches (docs/benchmarks.md: the 8B shape in passes of up to 2,000
    tokens trained 2.5 times slower than in one pass of about 4,400); graphed passes are not, and take about
    GRAPHED_PASS_FLOPS of work each."""

    def largest_pass(self, largest_batch: int) -> int:
        """The most tokens a pass can hold, for batches of up to `largest_batch` tokens."""
        return min(largest_batch, self.pass_tokens)

    def checkpointed(self, tokens: int) -> int:
        excess = self.keep_per_token * tokens * self.layers - self.budget
        if excess <= 0:
            return 0
        return min(self.layers, math.ceil(excess / ((self.keep_per_token - self.input_per_token) * tokens)))


def memory_plan(model: PreTrainedModel, lora_dropout: float, fused: bool, device: Device,
                longest: int | None, most: int | None = None) -> MemoryPlan:
    """The plan for `model` (the trainer's, on its device), LoRA on all linear layers, for examples of up to
    `longest` tokens (None: each batch in one pass); `fused`: Liger's RMSNorm and SwiGLU kernels, which keep less.

    A pass takes as many tokens as fit, up to `most`, and at least the longest example (which cannot be split).

    Per token and layer, in activations: the norms' inputs and outputs, q, k, v (after RoPE) and the attention
    output, the MLP's gate, up and product; without Liger, the norms' float32 intermediates and the MLP's
    activation too; LoRA dropout keeps a dropped copy (and its mask) of each LoRA layer's input instead of sharing
    it.
    """
    text = model.config.get_text_config()
    hidden, inner = text.hidden_size, text.intermediate_size
    heads = text.num_key_value_heads * (getattr(text, "head_dim", None) or hidden // text.num_attention_heads)
    elements = 6 * hidden + 2 * heads + 3 * inner
    if not fused:
        elements += 8 * hidden + inner
    if lora_dropout > 0:
        elements += 7 * hidden + inner // 2
    itemsize = next(p for p in model.parameters() if p.is_floating_point()).dtype.itemsize
    layers, budget = len(decoder_layers(model)), int(0.75 * free_memory(device))
    plan = MemoryPlan(elements * itemsize, hidden * itemsize, layers, budget)
    if longest is None:
        return plan
    fits = budget // (plan.keep_per_token * layers)
    return replace(plan, pass_tokens=max(min(fits, most or fits), longest))


def graphed_pass_tokens(model: torch.nn.Module) -> int:
    """The tokens of a graphed pass of `model` (GRAPHED_PASS_FLOPS)."""
    return int(GRAPHED_PASS_FLOPS / (2 * sum(p.numel() for p in model.parameters())))


def largest_batch(lengths: list[int], args: dict[str, Any]) -> int:
    """The most tokens a batch of these examples can hold, padding included, under the SFT config's `args`."""
    batch = int(args.get("per_device_train_batch_size", 8))
    if args.get("packing"):
        return batch * int(args["max_length"])
    if args.get("padding_free"):
        return sum(sorted(lengths)[-batch:])
    return batch * max(lengths)


def checkpoint_layers(layers: list[torch.nn.Module], count: int) -> None:
    """Recompute the activations of the first `count` of these decoder layers in the backward pass, keep the
    others'."""
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < count


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def free_memory(device: Device) -> int:
    """Bytes free on `device`."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def prepare(model: PreTrainedModel, padding_free: bool) -> None:
    """Set up the base model (before PEFT wraps it); `padding_free`: the batches will be."""
    if padding_free:
        register_attention()
        model.set_attn_implementation(VARLEN)


def finish(model: PreTrainedModel, speedups: Speedups, mixed_precision: bool) -> None:
    """Set up the trainer's model (PEFT's) for `speedups`."""
    if mixed_precision:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # PEFT casts each LoRA layer's input to the adapter's float32, a copy of every activation (and float32
        # dropout) that autocast casts back to bf16 for the matmul: the same result without both copies.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if speedups.fused_lora:
        from bentoservice.training.speed.fused_lora import fuse_lora_layers

        log.info("fused %d LoRA layers", fuse_lora_layers(model))
    if speedups.compile:
        compile_layers(model)
    elif speedups.liger:
        from transformers.integrations.liger import apply_liger_kernel

        # TRL's fused LM head computes the loss without the logits; Liger's would replace the model's forward.
        apply_liger_kernel(model, {"fused_linear_cross_entropy": False, "cross_entropy": False})


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
            log.info("passes of up to %d tokens, checkpointing at most %d of %d layers (batches of up to %d "
                     "tokens, %.1f GiB free)", largest, most, plan.layers, largest_batch, plan.budget / 0.75 / 2**30)
            if largest < largest_batch:
                self.pass_tokens = plan.pass_tokens
            if most:
                self.memory, self.layers = plan, decoder_layers(self.model)
                self.model.activation_checkpointing_enable({"use_reentrant": False})
                checkpoint_layers(self.layers, 0)
            return most

        def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                          num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
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
            if (self.args.include_num_input_tokens_seen != "no" and "cu_seq_lens_q" in inputs
                    and self.accelerator.num_processes == 1):
                self.state.num_input_tokens_seen += inputs["input_ids"].numel()
            else:
                super()._track_num_input_tokens(inputs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            for values in self._metrics["train"].values():
                read_back(values)
            super().log(logs, start_time)

        def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: torch.Tensor | int | None = None) -> Any:
            labelled = inputs.pop(LABELLED, None)
            if self.memory is not None and model.training:
                checkpoint_layers(self.layers, self.memory.checkpointed(inputs["input_ids"].numel()))
            labels = inputs.get("labels")
            plain = self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
            if not (plain and not self.aux_loss_enabled and not return_outputs and labels is not None
                    and labels.shape[0] == 1):
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
            count = keep.numel() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As Trainer and TRL do: the count holds every rank's tokens, and DDP averages the ranks' gradients.
                loss = loss * self.accelerator.num_processes
            return loss

        def fused_loss(self, inputs: dict[str, Any], labelled: int,
                       num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
            """TRL's loss and metrics for one process's padding-free training pass, of which `labelled` positions
            predict a labelled token, through fused_loss.py."""
            from bentoservice.training.speed.fused_loss import labelled_loss

            decoder = self.model.get_base_model().base_model
            hidden = decoder(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            divisor = labelled if num_items_in_batch is None else num_items_in_batch
            loss, entropy, top1 = labelled_loss(hidden.last_hidden_state[0], inputs["labels"][0], labelled, self.head,
                                                divisor)
            # TRL's metrics, kept on the device until they are logged.
            metrics, count = self._metrics["train"], max(labelled, 1)
            metrics["entropy"].append(entropy / count)
            metrics["mean_token_accuracy"].append(top1 / count)
            self._total_train_tokens += inputs["position_ids"].shape[1]
            metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    return FastSFTTrainer


def with_labelled_counts(inputs: dict[str, Any], passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `passes` of the padding-free batch `inputs` (consecutive parts of its row), each with how many of its
    positions predict a labelled token (under LABELLED), read back from the device at once."""
    labelled = (inputs["labels"][0] != IGNORE).cpu()
    counted, start = [], 0
    for part in passes:
        end = start + part["labels"].shape[1]
        counted.append({**part, LABELLED: int(labelled[start + 1:end].sum())})
        start = end
    return counted


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
    model.train = lambda mode=True: model if mode else type(model).train(model, mode)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.train


def split_passes(inputs: dict[str, Any], tokens: int, granularity: int = 1) -> list[dict[str, Any]]:
    """A padding-free batch (one row; TRL's `cu_seq_lens_q` marks where each example starts) as consecutive passes of
    whole examples (`_cuts`: as few as hold at most `tokens` tokens each, unless one example alone is longer, padded
    to multiples of `granularity`)."""
    bounds = inputs["cu_seq_lens_q"].tolist()
    if bounds[-1] <= tokens or len(bounds) <= 2:
        return [inputs]
    cuts = _cuts(bounds, tokens, granularity)
    row = inputs["input_ids"].shape[1]
    passes = []
    for first, last in itertools.pairwise(cuts):
        start, end = bounds[first], bounds[last]
        part = {key: value[:, start:end] if getattr(value, "ndim", 0) == 2 and value.shape[1] == row else value
                for key, value in inputs.items()}
        cu = inputs["cu_seq_lens_q"][first:last + 1] - start
        longest = max(b - a for a, b in zip(bounds[first:last], bounds[first + 1:last + 1], strict=False))
        part.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if "seq_idx" in part:
            part["seq_idx"] = part["seq_idx"] - first
        passes.append(part)
    return passes


def _cuts(bounds: list[int], tokens: int, granularity: int) -> list[int]:
    """Example indices that cut `bounds` (example starts, then the end) into passes of at most `tokens` tokens (an
    example longer than that alone): the fewest passes; of those, the fewest tokens once each pass is padded up to a
    multiple of `granularity` (a graphed pass runs in the bucket that holds it); then the smallest largest pass."""
    # best[j]: (passes, padded tokens, largest pass, where the last pass starts) for the first j examples.
    best: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
    for j in range(1, len(bounds)):
        options = []
        for i in range(j - 1, -1, -1):
            size = bounds[j] - bounds[i]
            if size > tokens and i < j - 1:
                break
            passes, padded, largest, _ = best[i]
            options.append((passes + 1, padded + -(-size // granularity) * granularity, max(largest, size), i))
        best.append(min(options))
    cuts = [len(bounds) - 1]
    while cuts[-1]:
        cuts.append(best[cuts[-1]][3])
    return cuts[::-1]


def compile_layers(model: PreTrainedModel) -> None:
    """Compile each decoder layer in place; they share one graph, so it compiles once whatever the depth."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiling %d decoder layers", len(layers))


@cache
def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, partial(varlen_attention, flash_options=_flash_options()))
    AttentionMaskInterface.register(VARLEN, _mask)


def _flash_options() -> dict[str, Any]:
    """How this torch's `varlen_attn` asks for causal attention and grouped key/value heads (read once, outside
    compiled code): torch 2.13 takes window_size and enable_gqa; earlier releases is_causal, and grouped heads
    as they are."""
    from torch.nn.attention.varlen import varlen_attn

    takes = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True}
    return {"causal": causal, "gqa": "enable_gqa" in takes}


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, q_length: int = 0, kv_length: int = 0,
          **kwargs: Any) -> torch.Tensor | None:
    """No mask where VARLEN needs none (no padding, no cache); SDPA's mask otherwise."""
    if attention_mask is None and q_length == kv_length:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     position_ids: torch.Tensor | None = None, flash_options: dict[str, Any] | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of padding-free rows.

    query/key/value: (batch, heads, tokens, dim); the output is (batch, tokens, heads, dim), as transformers'
    attention functions return it.
    """
    import torch

    batch, heads, tokens, dim = query.shape
    if cu_seq_lens_q is None and attention_mask is None and position_ids is not None and key.shape[2] == tokens:
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        # Packed position_ids without the collator's boundaries: the examples start where the positions restart.
        (cu_seq_lens_q, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, -1))
        max_length_q = int(longest)
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    q, k, v = (x.transpose(1, 2).reshape(batch * tokens, x.shape[1], dim) for x in (query, key, value))
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scaling, flash_options or {})
    else:
        out = _per_example(q, k, v, cu_seq_lens_q.tolist(), scaling)
    return out.view(batch, tokens, heads, dim), None


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                  max_length: int, scaling: float | None, options: dict[str, Any]) -> torch.Tensor:
    """(tokens, heads, dim) in and out."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = {"enable_gqa": True} if options["gqa"] and key.shape[1] != query.shape[1] else {}
    return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
                       **options["causal"], **gqa)


def _per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                 scaling: float | None) -> torch.Tensor:
    """One causal SDPA call per example; (tokens, heads, dim) in and out."""
    import torch
    import torch.nn.functional as F

    gqa = key.shape[1] != query.shape[1]
    # 4D inputs: SDPA's CPU flash kernel takes no others (3D ones fall back to the slower math path).
    parts = [F.scaled_dot_product_attention(*(x[None, start:end].transpose(1, 2) for x in (query, key, value)),
                                            is_causal=True, scale=scaling, enable_gqa=gqa)[0].transpose(0, 1)
             for start, end in zip(bounds[:-1], bounds[1:], strict=False) if end > start]
    return torch.cat(parts)
