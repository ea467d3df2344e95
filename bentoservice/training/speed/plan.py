"""The fast SFT path: padding-free batches, attention within each example, fused kernels where they pay.

Which speedups pay for a run (`Speedups`, `defaults`), the SFT config's arguments for them, how many layers
each batch checkpoints and how many tokens a pass holds (`MemoryPlan`), and the model's set-up before and after
PEFT wraps it. The trainer is trainer.py, the passes passes.py, the attention attention.py.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bentoservice.training.hardware import Device
from bentoservice.training.speed.attention import VARLEN, register_attention

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

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
    return Speedups(
        liger=importlib.util.find_spec("liger_kernel") is not None,
        compile=planned_tokens >= COMPILE_FROM_TOKENS,
        graphs=True,
        fused_loss=True,
        loader_workers=2,
    )


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


def memory_plan(
    model: PreTrainedModel,
    lora_dropout: float,
    fused: bool,
    device: Device,
    longest: int | None,
    most: int | None = None,
) -> MemoryPlan:
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


def compile_layers(model: PreTrainedModel) -> None:
    """Compile each decoder layer in place; they share one graph, so it compiles once whatever the depth."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiling %d decoder layers", len(layers))
