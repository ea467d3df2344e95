"""The GPU path: every loaded adapter's A and B stacked per layer, chosen per token by a 0/1 mask (fixed shapes, so
the step can be captured in a CUDA graph)."""

from __future__ import annotations

import torch
from torch import nn

from bentoservice.engine.lora.batch import LoraBatch


class BatchedLoraLinear(nn.Module):
    """A Linear plus per-token low-rank updates; stacks grow only as adapters are loaded.

    The stacks are kept transposed, so that both products of the mixed path read contiguous
    [in, stacked * rank] and [stacked * rank, out] matrices.
    """

    def __init__(self, base: nn.Linear, batch: LoraBatch) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A: torch.Tensor | None = None  # [in, stacked, rank]: A.T of every slot side by side
        self.lora_B: torch.Tensor | None = None  # [stacked, rank, out]: B.T of every slot

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def reserve(self, slots: int, rank: int = 1) -> None:
        """Make room for slots 1..slots-1 at `rank` (every wrapped layer holds as many as the manager hands out)."""
        weight = self.base.weight
        old_a, old_b = self.lora_A, self.lora_B
        cur_stacked, cur_rank = (0, 0) if old_a is None else old_a.shape[1:]
        stacked, rank = max(slots - 1, cur_stacked, self.batch.stacked), max(rank, cur_rank, self.batch.rank)
        if (stacked, rank) == (cur_stacked, cur_rank):
            return
        a = weight.new_zeros(self.in_features, stacked, rank)
        b = weight.new_zeros(stacked, rank, self.out_features)
        if old_a is not None:
            a[:, :cur_stacked, :cur_rank] = old_a
            b[:cur_stacked, :cur_rank] = old_b
        self.lora_A, self.lora_B = a, b
        self.batch.stacked, self.batch.rank = stacked, rank
        self.batch.layout += 1

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Write one adapter's A and B (scaled) into a slot, in place; ranks past its own are zeroed."""
        rank = a.shape[0]
        self.reserve(slot + 1, rank)
        stack_a, stack_b = self.lora_A, self.lora_B
        assert stack_a is not None and stack_b is not None  # made by reserve()
        stack_a[:, slot - 1, :rank].copy_(a.T)
        stack_b[slot - 1, :rank].copy_((b * scale).T)
        stack_a[:, slot - 1, rank:].zero_()
        stack_b[slot - 1, rank:].zero_()

    def clear_slot(self, slot: int) -> None:
        stack_a, stack_b = self.lora_A, self.lora_B
        if stack_a is not None and stack_b is not None and slot - 1 < stack_a.shape[1]:
            stack_a[:, slot - 1].zero_()
            stack_b[slot - 1].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch, stack_a, stack_b = self.batch, self.lora_A, self.lora_B
        if stack_a is None or stack_b is None or batch.single == 0:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        if batch.single is not None:
            index = batch.single - 1
            y2.addmm_(x2 @ stack_a[:, index], stack_b[index])
        else:  # every layer holds the same (stacked, rank) as the mask: reserve() grows them together
            y2.addmm_((x2 @ stack_a.view(self.in_features, -1)).mul_(batch.mask), stack_b.view(-1, self.out_features))
        return y
