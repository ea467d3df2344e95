"""Prompts' keys and values kept after their prefill, so that a later prompt that begins the same way (the
chat template's system prompt, an earlier turn of the same conversation) copies them instead of computing
them again.

An entry is one prompt's keys and values under one adapter (an adapter changes them), keyed by the adapter's
read (`LoraBatch.owner`: 0 for the bare base), not by its slot: an adapter that moves out of its slot and back
into another finds its entries again; they go when it leaves host memory or is unloaded (`drop`). A match is
the longest common prefix with any entry, and always leaves the prompt's last token to compute: its
logits give the first output token. Entries beyond a byte budget go, least recently used first.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

MIN_TOKENS = 8  # a shorter match saves less than its copies cost


@dataclass
class Entry:
    tokens: list[int]
    keys: list[torch.Tensor]  # per layer [kv_heads, length, head_dim]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._entries: collections.OrderedDict[tuple[int, tuple[int, ...]], Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, owner: int, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` under `owner`, and how many tokens it gives."""
        best, best_length = None, 0
        limit = len(prompt) - 1
        for key, entry in self._entries.items():
            if key[0] == owner and (length := _common_prefix(entry.tokens, prompt, limit)) > best_length:
                best, best_length = key, length
        if best is None or best_length < MIN_TOKENS:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best], best_length

    def wants(self, owner: int, tokens: list[int]) -> bool:
        """Whether these tokens' keys and values are worth reading out for `add` (an entry already held for
        them is marked as just used instead)."""
        if self.budget <= 0 or len(tokens) < MIN_TOKENS:
            return False
        key = (owner, tuple(tokens))
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        return True

    def add(self, owner: int, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep what `wants` asked for (a prompt twice in one pass is kept once)."""
        key = (owner, tuple(tokens))
        if key in self._entries:
            return
        entry = Entry(tokens, keys, values)
        if entry.nbytes > self.budget:
            return
        self._entries[key] = entry
        self.used += entry.nbytes
        while self.used > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.used -= dropped.nbytes

    def drop(self, owner: int) -> None:
        """Forget the entries of one adapter (it left host memory, or was unloaded)."""
        for key in [key for key in self._entries if key[0] == owner]:
            self.used -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
