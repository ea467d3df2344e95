"""The LM head and the loss of a training pass as one function that computes its gradient in the forward pass.

TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`) projects the hidden states through the LM head tile by
tile, never holding all the logits, but projects every tile twice: in the forward pass for the log-probabilities,
and again in the backward pass for the gradient. With a frozen LM head (LoRA trains none) the only gradient is the
hidden states', and the forward pass can compute it while it holds each tile: one product of the three per tile is
saved (the LM head is a fifth of Llama-3.2-1B's parameters). The tiles are folded by TRL's own kernels (Triton on a
GPU, torch elsewhere), so the loss, the entropy and the token accuracy are TRL's.

Nothing is read back to the host: the count of labelled positions comes from the caller, and the loss's divisor stays
a device tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# TRL's kernels are private names of the pinned trl release (pyproject.toml): a rename fails at import.
from trl.kernels.chunked_logprob import (
    _BLOCK_SIZE,
    _backward_kernel,
    _backward_tile,
    _forward_kernel,
    _forward_tile,
    _use_triton,
)

from bentoservice.training.data.labels import IGNORE

# The most logits a tile holds: TRL's tile (4,096 tokens by 32,768 vocabulary entries), 256 MiB in bf16.
TILE = 4096 * 32768
# Config attributes by which some models scale or cap the logits (TRL's fused LM head reads them): such heads are
# left to TRL.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# Arguments of TRL's kernels that a plain LM head fixes: no scale, no cap, temperature 1.
PLAIN = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `hidden @ weight.T` against `targets`, divided by `divisor`; also the summed
    entropy of the predicted distributions and how many targets were the most likely token (neither differentiable).
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        rows, vocab = hidden.shape[0], weight.shape[0]
        weight = weight.to(dtype)
        stats = torch.zeros(5, rows, dtype=torch.float32, device=device)
        sum_exp, x_sum_exp, unused, target_logit, log_z = stats
        running_max, max_before_target = torch.full((2, rows), float("-inf"), device=device)
        grad = torch.empty(rows, hidden.shape[1], dtype=dtype, device=device)
        chunk = max(1, min(rows, TILE // vocab))
        tile_buffer = torch.empty(chunk, vocab, dtype=dtype, device=device)
        # d(loss)/d(log p) of each labelled token, for TRL's backward kernel.
        grad_log_p = (-1 / divisor.float()).expand(chunk).contiguous()
        triton_kernels = _use_triton(device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            tile, part = tile_buffer[: end - start], slice(start, end)
            torch.mm(hidden[part].to(dtype), weight.t(), out=tile)
            fold = _forward_kernel[(end - start,)] if triton_kernels else _forward_tile
            fold(
                tile,
                tile.stride(0),
                targets[part],
                running_max[part],
                sum_exp[part],
                x_sum_exp[part],
                unused[part],
                unused[part],
                max_before_target[part],
                target_logit[part],
                0,
                vocab,
                HAS_ENTROPY=True,
                HAS_LOG_SUM_SQ_PROBS=False,
                HAS_MEAN_LOGITS=False,
                HAS_IS_TOP1=True,
                BLOCK_SIZE=_BLOCK_SIZE,
                **PLAIN,
            )
            torch.add(running_max[part], sum_exp[part].log(), out=log_z[part])
            # The tile becomes the gradient of the loss with respect to its logits, in place.
            unfold = _backward_kernel[(end - start, -(-vocab // _BLOCK_SIZE))] if triton_kernels else _backward_tile
            unfold(
                tile,
                tile.stride(0),
                targets[part],
                log_z[part],
                log_z[part],
                grad_log_p[: end - start],
                grad_log_p[: end - start],
                0,
                vocab,
                HAS_LOGPROB_GRAD=True,
                HAS_ENTROPY_GRAD=False,
                BLOCK_SIZE=_BLOCK_SIZE,
                **PLAIN,
            )
            torch.mm(tile, weight, out=grad[start:end])
        loss = (log_z - target_logit).sum() / divisor
        entropy = (log_z - x_sum_exp / sum_exp).sum()
        top1 = ((target_logit >= running_max) & (target_logit > max_before_target)).sum()
        ctx.save_for_backward(grad)
        ctx.input_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy, top1)
        return loss, entropy, top1

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).to(ctx.input_dtype), None, None, None


def plain_head(model: nn.Module) -> nn.Linear | None:
    """`model`'s (a causal LM's) LM head, if it is a frozen linear layer without bias whose logits nothing scales or
    caps; None otherwise."""
    head = model.get_output_embeddings()
    text = model.config.get_text_config()
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
        or any(getattr(text, name, None) is not None for name in LOGIT_TRANSFORMS)
    ):
        return None
    return head


def labelled_loss(
    hidden: torch.Tensor, labels: torch.Tensor, labelled: int, head: nn.Linear, divisor: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of one padding-free row: `hidden` [tokens, hidden] predicts `labels` [tokens] shifted by one, of which
    `labelled` are not IGNORE (-100); the summed cross-entropy over `divisor`, the entropy summed over the labelled
    positions, and how many of them the model predicts as its top token."""
    targets = labels[1:]
    keep = torch.nonzero_static(targets != IGNORE, size=labelled).squeeze(-1)
    # TRL's divisor: the step's labelled tokens (Trainer's count), at least 1; a number is filled in on the device,
    # not copied there (a copy from the host waits for the GPU).
    if isinstance(divisor, torch.Tensor):
        total = divisor.clamp(min=1)
    else:
        total = torch.full((), max(divisor, 1), device=hidden.device)
    return LinearCrossEntropy.apply(
        hidden[:-1].index_select(0, keep), head.weight, targets.index_select(0, keep), total
    )
