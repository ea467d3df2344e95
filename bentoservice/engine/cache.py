"""A KV cache with one row per running sequence, each at its own length.

Rows in use are kept contiguous (a finished row is replaced by the last one), so every forward
pass works on a slice of rows and a slice of positions: views, not copies.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

_LEN_STEP = 256


class SlotCache(Cache):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers=[])
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.n_layers = layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(0, 0)
        # The forward pass under way: rows [row0, row0 + n), each starting at starts[i].
        self.row0 = 0
        self.starts: torch.Tensor | None = None
        self.end = 0
        self.prefill = False

    def _alloc(self, rows: int, length: int) -> None:
        kv_heads, head_dim = self.shape
        old = list(zip(self.keys, self.values))
        new_shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(new_shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(new_shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        for (k_old, v_old), k, v in zip(old, self.keys, self.values):
            r, _, n, _ = k_old.shape
            r, n = min(r, rows), min(n, length)
            k[:r, :, :n] = k_old[:r, :, :n]
            v[:r, :, :n] = v_old[:r, :, :n]

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        cur_rows, cur_len = self.capacity
        if rows > cur_rows or length > cur_len:
            length = max(cur_len, -(-length // _LEN_STEP) * _LEN_STEP)
            self._alloc(max(rows, cur_rows), length)

    def clear(self) -> None:
        self._alloc(0, 0)

    def move_row(self, src: int, dst: int) -> None:
        for k, v in zip(self.keys, self.values):
            k[dst] = k[src]
            v[dst] = v[src]

    def begin(self, row0: int, starts: torch.Tensor, end: int, prefill: bool) -> None:
        """Set up the next forward pass: rows from row0, written at `starts`, attending up to `end`."""
        self.row0, self.starts, self.end, self.prefill = row0, starts, end, prefill

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n, _, q, _ = key_states.shape
        rows = slice(self.row0, self.row0 + n)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill:  # every row starts at 0 (right-padded prompts)
            k[rows, :, :q] = key_states
            v[rows, :, :q] = value_states
        else:  # one new token per row, each at its own position
            index = torch.arange(self.row0, self.row0 + n, device=self.device)
            k[index, :, self.starts] = key_states[:, :, 0]
            v[index, :, self.starts] = value_states[:, :, 0]
        return k[rows, :, :self.end], v[rows, :, :self.end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
