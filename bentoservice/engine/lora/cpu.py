"""The CPU path: a batch's tokens grouped by adapter, each computing only its own adapter, in one call of the
compiled kernel (`native`) per group of layers or, where it cannot be built, as batched torch products."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from bentoservice.engine import native
from bentoservice.engine.lora.batch import LoraBatch
from bentoservice.engine.lora.gpu import BatchedLoraLinear


class LoraGroup:
    """The LoRA updates of layers that read one input (q, k and v; gate and up), added into their fused
    output, whose columns are the layers' outputs side by side.

    The layers' A stacks are copied side by side once per adapter change, as [stacked, in, layers * rank], so
    that a pass runs one A product for the group; each layer's B product then adds into its own columns.
    """

    def __init__(
        self,
        batch: LoraBatch,
        parent: nn.Module,
        names: list[str],
        kernel: Callable[[int, int, int, int, int, int], None] | None = None,
    ) -> None:
        self.batch = batch
        self.parent, self.names = parent, names
        self.kernel = kernel  # native.Kernels.lora_add, or None for torch operations
        widths = [getattr(parent, name).out_features for name in names]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self._columns = [slice(start, start + width) for start, width in zip(starts, widths, strict=False)]
        self.a: torch.Tensor | None = None
        self.targets: list[tuple[slice, torch.Tensor]] = []  # (output columns, B stack) per wrapped layer
        self._stacks: list[torch.Tensor] = []  # the wrapped layers' A stacks, as of the last refresh
        self._layout = -1  # the stacks' layout (LoraBatch.layout) that `a` was copied from
        self._native: native.Group | None = None

    def refresh(self) -> None:
        """Read the stacks again: the adapter manager wraps layers and grows or rewrites their stacks."""
        self._layout = self.batch.layout
        wrapped = [
            (columns, layer)
            for columns, name in zip(self._columns, self.names, strict=False)
            if isinstance(layer := getattr(self.parent, name), BatchedLoraLinear) and layer.lora_A is not None
        ]
        self._stacks = [layer.lora_A for _, layer in wrapped]
        if not wrapped:
            self.a, self.targets = None, []
            return
        a = torch.stack(self._stacks, dim=2)  # [in, stacked, layers, rank]
        self.a = a.permute(1, 0, 2, 3).flatten(2).contiguous()
        self.targets = [(columns, layer.lora_B) for columns, layer in wrapped]
        if self.kernel is not None:
            self._native = native.Group.of(self.a, [(columns.start, b) for columns, b in self.targets])

    def slot_rewritten(self, slot: int) -> None:
        """Copy one rewritten slot's A stacks in place (B is read from the layers' own stacks), unless the stacks
        were reallocated or layers wrapped since the last refresh: an adapter swap copies one slot, not all."""
        if self.batch.layout != self._layout:
            self.refresh()
        elif self.a is not None:
            self.a[slot - 1].copy_(torch.cat([stack[:, slot - 1] for stack in self._stacks], dim=1))

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
                y[:, columns].addmm_(t[:, i * rank : (i + 1) * rank], b[index])
            return
        segments = batch.segments
        groups, width = segments.valid.shape[:2]
        stacks = slice(segments.first, segments.first + groups)
        t = torch.bmm(x.index_select(0, segments.order).view(groups, width, -1), self.a[stacks])
        t.mul_(segments.valid)
        for i, (columns, b) in enumerate(self.targets):
            update = torch.bmm(t[:, :, i * rank : (i + 1) * rank], b[stacks])
            y[:, columns] += update.view(groups * width, -1).index_select(0, segments.place)

    def _add_native(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """`add` in one call of the CPU kernel (x and y: float32 rows of contiguous columns)."""
        assert self.kernel is not None and self._native is not None  # set together in refresh()
        self.kernel(
            ctypes.addressof(self._native),
            ctypes.addressof(self.batch.native),
            x.data_ptr(),
            x.stride(0),
            y.data_ptr(),
            y.stride(0),
        )
