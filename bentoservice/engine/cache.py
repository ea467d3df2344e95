"""A KV cache with one row per running sequence, each at its own length.

Rows in use are kept contiguous (a finished row is replaced by the last one), so a decode pass works
on the first rows and the first positions of the cache: views, not copies. Two kinds of pass:

- decode: one new token per row, row i at position positions[i]; attention over the row's cache.
- prefill: prompts packed into one sequence of tokens; token t goes to row rows[t] at positions[t],
  and attention stays among the new tokens (the caller's mask keeps each prompt to itself). When some
  prompts' first tokens are already in their rows (a reused prefix), the pass attends over a `context`
  instead: every token of each prompt, gathered from the rows after the new ones are written.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

LENGTH_STEP = 256


class SlotCache(Cache):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers=[])
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.n_layers = layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(0, 0)
        # The pass under way (see the module docstring).
        self.packed = False
        self.rows = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.length = 0
        self.context: tuple[torch.Tensor, torch.Tensor] | None = None

    def _alloc(self, rows: int, length: int) -> None:
        kv_heads, head_dim = self.shape
        old = list(zip(self.keys, self.values, strict=False))
        new_shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(new_shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(new_shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        for (k_old, v_old), k, v in zip(old, self.keys, self.values, strict=False):
            r, _, n, _ = k_old.shape
            r, n = min(r, rows), min(n, length)
            k[:r, :, :n] = k_old[:r, :, :n]
            v[:r, :, :n] = v_old[:r, :, :n]

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> bool:
        """Grow to hold `rows` rows of `length` positions; True when the tensors moved."""
        cur_rows, cur_len = self.capacity
        if rows <= cur_rows and length <= cur_len:
            return False
        length = max(cur_len, -(-length // LENGTH_STEP) * LENGTH_STEP)
        self._alloc(max(rows, cur_rows), length)
        return True

    def clear(self) -> None:
        self._alloc(0, 0)

    def move_rows(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy rows `sources` onto rows `targets` (all read before any is written)."""
        for k, v in zip(self.keys, self.values, strict=False):
            k[targets] = k[sources]
            v[targets] = v[sources]

    def decode(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        """The next pass: row rows[i] (rows are 0..n-1) writes at positions[i] and attends up to `length`."""
        self.packed, self.rows, self.positions, self.length = False, rows, positions, length

    def prefill(
        self, rows: torch.Tensor, positions: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """The next pass: packed prompts, token t written to row rows[t] at positions[t]; with `context`
        (rows, positions), attention reads the keys and values at those places instead of the new ones."""
        self.packed, self.rows, self.positions, self.context = True, rows, positions, context

    def copy_in(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Put a reused prefix (per layer [kv_heads, >= length, head_dim]) at the start of `row`."""
        for k, v, k_in, v_in in zip(self.keys, self.values, keys, values, strict=False):
            k[row, :, :length] = k_in[:, :length]
            v[row, :, :length] = v_in[:, :length]

    def copy_out(self, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first `length` keys and values of `row`, per layer."""
        return ([k[row, :, :length].clone() for k in self.keys], [v[row, :, :length].clone() for v in self.values])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.packed:  # [1, heads, tokens, dim]
            k[self.rows, :, self.positions] = key_states[0].transpose(0, 1)
            v[self.rows, :, self.positions] = value_states[0].transpose(0, 1)
            if self.context is None:
                return key_states, value_states
            rows, positions = self.context
            return k[rows, :, positions].transpose(0, 1)[None], v[rows, :, positions].transpose(0, 1)[None]
        k[self.rows, :, self.positions] = key_states[:, :, 0]  # [rows, heads, 1, dim]
        v[self.rows, :, self.positions] = value_states[:, :, 0]
        n = key_states.shape[0]
        return k[:n, :, : self.length], v[:n, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
