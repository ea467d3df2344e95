"""The adapter slot of each token of a forward pass, and its tokens grouped by adapter for the CPU paths."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from bentoservice.engine import native


def tokens_by_slot(slots: list[int]) -> dict[int, list[int]]:
    """The tokens of each adapter slot in use (not 0, the base), in token order."""
    members: dict[int, list[int]] = {}
    for token, slot in enumerate(slots):
        if slot:
            members.setdefault(slot, []).append(token)
    return members


@dataclass
class Segments:
    """The tokens of a mixed pass grouped by adapter: group g holds the tokens of slot first + 1 + g (stack
    entry first + g), padded to one width by repeats of token 0 that `valid` zeroes. A base token's update
    is read from a padding entry (a group is widened by one where no padding would be left)."""

    first: int
    order: torch.Tensor  # [groups * width] token indices, group after group
    valid: torch.Tensor  # [groups, width, 1]: 1 for a token, 0 for padding
    place: torch.Tensor  # [tokens]: each token's entry in `order` (a padding entry for a base token)

    @classmethod
    def of(cls, slots: list[int], dtype: torch.dtype, device: torch.device) -> Segments:
        by_slot = tokens_by_slot(slots)
        first = min(by_slot)
        members = [by_slot.get(slot, []) for slot in range(first, max(by_slot) + 1)]
        width = max(len(tokens) for tokens in members)
        if sum(map(len, members)) < len(slots) and all(len(tokens) == width for tokens in members):
            width += 1
        order = [token for tokens in members for token in tokens + [0] * (width - len(tokens))]
        valid = [[[1.0]] * len(tokens) + [[0.0]] * (width - len(tokens)) for tokens in members]
        padding = next((g * width + width - 1 for g, tokens in enumerate(members) if len(tokens) < width), 0)
        place = [padding] * len(slots)
        for g, tokens in enumerate(members):
            for i, token in enumerate(tokens):
                place[token] = g * width + i
        return cls(
            first - 1,
            torch.tensor(order, device=device),
            torch.tensor(valid, dtype=dtype, device=device),
            torch.tensor(place, device=device),
        )


def native_pass(slots: list[int]) -> native.Pass:
    """The tokens that use an adapter, grouped by adapter (block after block, each in token order), for the CPU
    kernel."""
    blocks = sorted(tokens_by_slot(slots).items())
    sizes = [len(tokens) for _, tokens in blocks]
    return native.Pass.of(
        torch.tensor([0, *itertools.accumulate(sizes)]),
        torch.tensor([slot - 1 for slot, _ in blocks], dtype=torch.int64),
        torch.tensor([token for _, tokens in blocks for token in tokens], dtype=torch.int64),
    )


class LoraBatch:
    """The adapter slot of each token in the forward pass under way; shared by every wrapped layer."""

    def __init__(self) -> None:
        self.single: int | None = 0  # set when every token uses the same slot (0: the base, no LoRA)
        self.mask: torch.Tensor | None = None  # [tokens, stacked * rank] when slots are mixed
        self.stacked = 0  # adapter slots held in the stacks (slots 1..stacked)
        self.rank = 0
        self.layout = 0  # counts reallocations of the stacks (captured passes read their addresses)
        self.owners: dict[int, int] = {}  # slot -> the id of the adapter's read in it (PreparedAdapter.uid)
        self._slots: tuple[list[int], torch.dtype, torch.device] = ([], torch.float32, torch.device("cpu"))
        self._segments: Segments | None = None
        self._native: native.Pass | None = None

    def set(self, slots: list[int], dtype: torch.dtype, device: torch.device, out: torch.Tensor | None = None) -> None:
        """The slot of each token of the pass, in order.

        With `out` (a preallocated mask, at least as long as the pass, for CUDA graphs) the mixed
        path is always taken, so that a captured pass does not depend on the slots.
        """
        self._slots, self._segments, self._native = (slots, dtype, device), None, None
        if out is None and len(set(slots)) == 1:
            self.single, self.mask = slots[0], None
            return
        columns = torch.arange(self.stacked * self.rank) // max(self.rank, 1) + 1
        mask = (columns == torch.tensor(slots)[:, None]).to(dtype)
        if out is None:
            self.mask = mask.to(device)
        else:  # from pinned memory, so that the copy does not wait for the device to finish its work
            self.mask = out[: len(slots)]
            self.mask.copy_(mask.pin_memory(), non_blocking=True)
        self.single = None

    def owner(self, slot: int) -> int:
        """Who the keys and values computed under `slot` belong to: the read of its adapter; 0 for the base."""
        return self.owners.get(slot, 0) if slot else 0

    @property
    def segments(self) -> Segments:
        """The mixed pass's tokens grouped by adapter (made on first use: only the CPU's lean pass asks)."""
        if self._segments is None:
            self._segments = Segments.of(*self._slots)
        return self._segments

    @property
    def native(self) -> native.Pass:
        """The pass's tokens grouped by adapter for the CPU kernel (made on first use)."""
        if self._native is None:
            self._native = native_pass(self._slots[0])
        return self._native
