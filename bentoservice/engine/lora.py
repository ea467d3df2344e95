"""Batched LoRA: every loaded adapter's A and B stacked per layer, chosen per batch row by index.

Rows of one forward pass may each use a different adapter (slot 0 is the bare base, all zeros),
so requests for different adapters share one batch without cross-talk. The scaling factor is
folded into B at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoraBatch:
    """The adapter slot of each row in the forward pass under way; shared by every wrapped layer."""

    indices: torch.Tensor | None = None
    single: int | None = None  # set when every row uses the same slot

    def set(self, slots: list[int], device: torch.device) -> None:
        distinct = set(slots)
        if distinct == {0}:
            self.indices, self.single = None, 0
        elif len(distinct) == 1:
            self.indices, self.single = None, slots[0]
        else:
            self.indices, self.single = torch.tensor(slots, device=device), None


class BatchedLoraLinear(nn.Module):
    """A Linear plus per-row low-rank updates; stacks grow only as adapters are loaded."""

    def __init__(self, base: nn.Linear, batch: LoraBatch) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A: torch.Tensor | None = None  # [slots, rank, in]
        self.lora_B: torch.Tensor | None = None  # [slots, out, rank]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def _grow(self, slots: int, rank: int) -> None:
        weight = self.base.weight
        old_a, old_b = self.lora_A, self.lora_B
        cur_slots, cur_rank = (0, 0) if old_a is None else (old_a.shape[0], old_a.shape[1])
        slots, rank = max(slots, cur_slots), max(rank, cur_rank)
        if (slots, rank) == (cur_slots, cur_rank):
            return
        a = weight.new_zeros(slots, rank, self.in_features)
        b = weight.new_zeros(slots, self.out_features, rank)
        if old_a is not None:
            a[:cur_slots, :cur_rank] = old_a
            b[:cur_slots, :, :cur_rank] = old_b
        self.lora_A, self.lora_B = a, b

    def reserve(self, slots: int, rank: int = 1) -> None:
        """Make room for `slots` slots (every wrapped layer holds as many as the manager hands out)."""
        self._grow(slots, rank)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        rank = a.shape[0]
        self._grow(slot + 1, rank)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank] = a.to(self.lora_A)
        self.lora_B[slot, :, :rank] = (b * scale).to(self.lora_B)

    def clear_slot(self, slot: int) -> None:
        if self.lora_A is not None and slot < self.lora_A.shape[0]:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if self.lora_A is None or batch.single == 0:
            return y
        if batch.single is not None:
            return y + (x @ self.lora_A[batch.single].T) @ self.lora_B[batch.single].T
        a, b = self.lora_A[batch.indices], self.lora_B[batch.indices]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
