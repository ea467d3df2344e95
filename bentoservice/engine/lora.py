"""Batched LoRA: every loaded adapter's A and B stacked per layer, chosen per token by a mask.

Tokens of one forward pass may each use a different adapter (slot 0 is the bare base, which has no
stack entry), so requests for different adapters share one batch without cross-talk. A mixed batch
runs two dense products over the concatenated ranks of all stacked adapters, with a per-token 0/1
mask between them that keeps each token's own adapter: no per-token gather of weights, and fixed
shapes, so the step can be captured in a CUDA graph. The scaling factor is folded into B at load time.

On a CPU (the lean pass, `LoraGroup`) a batch instead groups its tokens by adapter, so that each token
computes only its own adapter (the mask's products compute every adapter for every token, which there costs
as much time as it costs FLOPs): in one call of the compiled kernel (`native`) per group of layers, or,
where it cannot be built, as batched torch products, one batch entry per adapter.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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
        return cls(first - 1, torch.tensor(order, device=device), torch.tensor(valid, dtype=dtype, device=device),
                   torch.tensor(place, device=device))


def native_pass(slots: list[int]) -> native.Pass:
    """The tokens that use an adapter, grouped by adapter (block after block, each in token order), for the CPU
    kernel."""
    blocks = sorted(tokens_by_slot(slots).items())
    sizes = [len(tokens) for _, tokens in blocks]
    return native.Pass.of(torch.tensor([0, *itertools.accumulate(sizes)]),
                          torch.tensor([slot - 1 for slot, _ in blocks], dtype=torch.int64),
                          torch.tensor([token for _, tokens in blocks for token in tokens], dtype=torch.int64))


class LoraBatch:
    """The adapter slot of each token in the forward pass under way; shared by every wrapped layer."""

    def __init__(self) -> None:
        self.single: int | None = 0  # set when every token uses the same slot (0: the base, no LoRA)
        self.mask: torch.Tensor | None = None  # [tokens, stacked * rank] when slots are mixed
        self.stacked = 0  # adapter slots held in the stacks (slots 1..stacked)
        self.rank = 0
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

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        rank = a.shape[0]
        self.reserve(slot + 1, rank)
        self.clear_slot(slot)
        self.lora_A[:, slot - 1, :rank] = a.T.to(self.lora_A)
        self.lora_B[slot - 1, :rank] = (b * scale).T.to(self.lora_B)

    def clear_slot(self, slot: int) -> None:
        if self.lora_A is not None and slot - 1 < self.lora_A.shape[1]:
            self.lora_A[:, slot - 1].zero_()
            self.lora_B[slot - 1].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if self.lora_A is None or batch.single == 0:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        if batch.single is not None:
            index = batch.single - 1
            y2.addmm_(x2 @ self.lora_A[:, index], self.lora_B[index])
        else:  # every layer holds the same (stacked, rank) as the mask: reserve() grows them together
            y2.addmm_((x2 @ self.lora_A.view(self.in_features, -1)).mul_(batch.mask),
                      self.lora_B.view(-1, self.out_features))
        return y


class LoraGroup:
    """The LoRA updates of layers that read one input (q, k and v; gate and up), added into their fused
    output, whose columns are the layers' outputs side by side.

    The layers' A stacks are copied side by side once per adapter change, as [stacked, in, layers * rank], so
    that a pass runs one A product for the group; each layer's B product then adds into its own columns.
    """

    def __init__(self, batch: LoraBatch, parent: nn.Module, names: list[str],
                 kernel: Callable[[int, int, int, int, int, int], None] | None = None) -> None:
        self.batch = batch
        self.parent, self.names = parent, names
        self.kernel = kernel  # native.Kernels.lora_add, or None for torch operations
        widths = [getattr(parent, name).out_features for name in names]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self._columns = [slice(start, start + width) for start, width in zip(starts, widths)]
        self.a: torch.Tensor | None = None
        self.targets: list[tuple[slice, torch.Tensor]] = []  # (output columns, B stack) per wrapped layer
        self._native: native.Group | None = None

    def refresh(self) -> None:
        """Read the stacks again: the adapter manager wraps layers and grows or rewrites their stacks."""
        wrapped = [(columns, layer) for columns, name in zip(self._columns, self.names)
                   if isinstance(layer := getattr(self.parent, name), BatchedLoraLinear) and layer.lora_A is not None]
        if not wrapped:
            self.a, self.targets = None, []
            return
        a = torch.stack([layer.lora_A for _, layer in wrapped], dim=2)  # [in, stacked, layers, rank]
        self.a = a.permute(1, 0, 2, 3).flatten(2).contiguous()
        self.targets = [(columns, layer.lora_B) for columns, layer in wrapped]
        if self.kernel is not None:
            self._native = native.Group.of(self.a, [(columns.start, b) for columns, b in self.targets])

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[:, layer's columns] += that layer's LoRA update of x, for each token's adapter."""
        batch = self.batch
        if self.a is None or batch.single == 0:
            return
        rank = batch.rank
        if self.kernel is not None:
            self._add_native(x, y)
            return
        if batch.single is not None:
            index = batch.single - 1
            t = x @ self.a[index]
            for i, (columns, b) in enumerate(self.targets):
                y[:, columns].addmm_(t[:, i * rank:(i + 1) * rank], b[index])
            return
        segments = batch.segments
        groups, width = segments.valid.shape[:2]
        stacks = slice(segments.first, segments.first + groups)
        t = torch.bmm(x.index_select(0, segments.order).view(groups, width, -1), self.a[stacks])
        t.mul_(segments.valid)
        for i, (columns, b) in enumerate(self.targets):
            update = torch.bmm(t[:, :, i * rank:(i + 1) * rank], b[stacks])
            y[:, columns] += update.view(groups * width, -1).index_select(0, segments.place)

    def _add_native(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """`add` in one call of the CPU kernel (x and y: float32 rows of contiguous columns)."""
        self.kernel(ctypes.addressof(self._native), ctypes.addressof(self.batch.native), x.data_ptr(), x.stride(0),
                    y.data_ptr(), y.stride(0))
