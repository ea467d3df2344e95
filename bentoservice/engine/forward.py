"""The engine's model passes: packed prefill and batched decode over the slot cache.

On a GPU the decode pass is replayed from CUDA graphs, one per (batch bucket, cache length, LoRA or
not): an eager step there costs tens of milliseconds of kernel launches. A graph's inputs are fixed
buffers (token, position and LoRA mask of each row); rows past the batch are padding that writes
only to free cache rows. Graphs are captured on first use and dropped when the cache or the adapter
stacks move.

On a CPU, Llama-architecture models run through the lean pass of `lean.py` instead of the HF modules.

A decode pass returns a `Step` at once, before the device has finished it. The next pass can take its
input tokens straight from that step's device output (`Chained`), so the caller can queue pass N+1
and then read pass N's tokens while the device runs N+1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from bentoservice.engine import native
from bentoservice.engine.attention import use_varlen
from bentoservice.engine.cache import LENGTH_STEP, SlotCache
from bentoservice.engine.lean import LeanModel, supports
from bentoservice.engine.lora import LoraBatch
from bentoservice.engine.packing import pack_linears
from bentoservice.engine.prefixes import PrefixStore

log = logging.getLogger(__name__)


@dataclass
class Step:
    """A decode pass queued on the device: row i's logits and greedy token."""

    logits: torch.Tensor
    greedy: torch.Tensor
    host: torch.Tensor | None = None  # the greedy tokens, being copied to pinned memory (GPU)
    copied: torch.cuda.Event | None = None

    def greedy_tokens(self) -> list[int]:
        """Waits for this pass (only: a pass queued after it may still be running)."""
        if self.copied is None or self.host is None:
            return self.greedy.tolist()
        self.copied.synchronize()
        return self.host.tolist()


@dataclass
class Chained:
    """Input tokens that are the greedy outputs of an earlier step: row i takes that step's row rows[i]."""

    step: Step
    rows: list[int]


def batch_buckets(max_rows: int) -> list[int]:
    """Decode batch sizes that get a graph: powers of two, then max_rows itself."""
    sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return [*sizes, max_rows]


class Forward:
    def __init__(self, model: Any, lora: LoraBatch, max_rows: int, cuda_graphs: bool, prefix_bytes: int = 0) -> None:
        self.lean = LeanModel(model, lora, max_rows, native.kernels()) if not cuda_graphs and supports(model) else None
        if self.lean is None and not cuda_graphs and next(model.parameters()).device.type == "cpu":
            pack_linears(model, max_rows)
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.lora = lora
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache = SlotCache(config.num_hidden_layers, kv_heads, head_dim, model.dtype, self.device)
        self.prefixes = PrefixStore(prefix_bytes)
        self.cuda_graphs = cuda_graphs
        self.varlen = use_varlen(model)
        self.buckets = batch_buckets(max_rows)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._layout = lora.layout
        self._drop_graphs()
        if cuda_graphs:
            rows = self.buckets[-1]
            self._inputs = torch.zeros(2, rows, dtype=torch.long, device=self.device)  # tokens, positions
            self._rows = torch.arange(rows, device=self.device)
            self._lora_mask: torch.Tensor | None = None

    # -- cache rows -----------------------------------------------------------------------------

    def _reserve(self, rows: int, length: int) -> None:
        if self.cuda_graphs:  # graphs read fixed addresses: allocate every row once, grow rarely
            rows = self.buckets[-1]
        elif rows > self.cache.capacity[0]:  # each growth copies the cache: grow geometrically
            rows = min(max(rows, 2 * self.cache.capacity[0]), self.buckets[-1])
        if self.cache.reserve(rows, length):
            self._drop_graphs()

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        self.cache.move_rows(self._to_device(sources), self._to_device(targets))

    def fork(self, source: int, targets: list[int], length: int) -> None:
        """Copy the first `length` keys and values of row `source` into rows `targets`."""
        self._reserve(max(targets) + 1, length + 1)
        keys, values = self.cache.copy_out(source, length)
        for row in targets:
            self.cache.copy_in(row, keys, values, length)

    def idle(self) -> None:
        """Nothing is running: give the cache's memory back (kept on a GPU, where graphs point at it)."""
        if not self.cuda_graphs:
            self.cache.clear()

    def adapters_changed(self) -> None:
        if self.lean is not None:
            self.lean.adapters_changed()
        self._drop_graphs()
        self._lora_mask = None

    def slot_rewritten(self, slot: int) -> None:
        """One adapter slot was rewritten in place: captured passes stay unless the stacks were reallocated (they
        grow until they hold max_loras slots at the largest rank, then keep their shape)."""
        if self.lean is not None:
            self.lean.slot_rewritten(slot)
        if self.lora.layout != self._layout:
            self._layout = self.lora.layout
            self._drop_graphs()
            self._lora_mask = None

    def _drop_graphs(self) -> None:
        """Forget the captured graphs. Their memory pool goes with them: capturing into a pool whose graphs
        were all freed trips an assert in PyTorch's allocator, so later captures share a new one."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # -- passes ---------------------------------------------------------------------------------

    def prefill(self, prompts: list[list[int]], slots: list[int], row0: int) -> torch.Tensor:
        """Prompts packed into one pass, written to rows row0...; the logits of each prompt's last token.
        A prompt's beginning found in the prefix store is copied into its row instead of computed."""
        full = [len(p) for p in prompts]
        self._reserve(row0 + len(prompts), max(full) + 1)
        reused = [
            self._reuse(prompt, slot, row0 + i) for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=False))
        ]
        lengths = [n - r for n, r in zip(full, reused, strict=False)]
        ends = list(accumulate(lengths))
        segment = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lengths))
        positions = torch.cat([torch.arange(r, n) for n, r in zip(full, reused, strict=False)])
        keys_segment, keys_position, context = segment, positions, None
        if any(reused):  # attention reads whole prompts from the rows: reused and new tokens
            keys_segment = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(full))
            keys_position = torch.cat([torch.arange(n) for n in full])
            context = ((keys_segment + row0).to(self.device), keys_position.to(self.device))
        self.cache.prefill((segment + row0).to(self.device), positions.to(self.device), context)
        self.lora.set(
            [slot for slot, n in zip(slots, lengths, strict=False) for _ in range(n)], self.dtype, self.device
        )
        if self.varlen and context is None:  # prompt boundaries instead of a mask (a 4D placeholder: none is built)
            attention = {
                "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device),
                "cu_seqlens": self._to_device([0, *ends]).int(),
                "max_seqlen": max(lengths),
            }
        else:
            mask = (segment[:, None] == keys_segment[None, :]) & (keys_position[None, :] <= positions[:, None])
            attention = {"attention_mask": mask[None, None].to(self.device)}
        ids = torch.tensor([t for p, r in zip(prompts, reused, strict=False) for t in p[r:]], device=self.device)
        positions = positions.to(self.device)
        if self.lean is not None:
            hidden = self.lean(ids, positions, attention["attention_mask"][0, 0], self.cache)
        else:
            hidden = self.decoder(
                input_ids=ids[None],
                position_ids=positions[None],
                past_key_values=self.cache,
                use_cache=True,
                **attention,
            ).last_hidden_state[0]
        for i, (prompt, slot) in enumerate(zip(prompts, slots, strict=False)):
            if self.prefixes.wants(owner := self.lora.owner(slot), prompt):
                self.prefixes.add(owner, prompt, *self.cache.copy_out(row0 + i, full[i]))
        last = torch.tensor(ends, device=self.device) - 1
        return self._logits(hidden[last])

    def _reuse(self, prompt: list[int], slot: int, row: int) -> int:
        """Copy the longest stored prefix of `prompt` into `row`; how many tokens that is."""
        entry, length = self.prefixes.match(self.lora.owner(slot), prompt)
        if entry is not None:
            self.cache.copy_in(row, entry.keys, entry.values, length)
        return length

    def decode(self, tokens: list[int] | Chained, positions: list[int], slots: list[int]) -> Step:
        """One token for each of rows 0..n-1, at `positions`, with the adapters in `slots`."""
        n, length = len(positions), max(positions) + 1
        if isinstance(tokens, Chained):
            ids = tokens.step.greedy
            if tokens.rows != list(range(n)):
                ids = ids.index_select(0, self._to_device(tokens.rows))
            ids = ids[:n]
        else:
            ids = self._to_device(tokens)
        if not self.cuda_graphs:
            self._reserve(n, length)
            self.lora.set(slots, self.dtype, self.device)
            logits = self._decode_pass(ids[:, None], self._to_device(positions), length)
            return Step(logits, logits.argmax(-1))
        size = next(b for b in self.buckets if b >= n)
        length = -(-length // LENGTH_STEP) * LENGTH_STEP
        self._reserve(size, length)
        self._inputs[:, n:size].zero_()
        self._inputs[0, :n].copy_(ids)
        self._inputs[1, :n].copy_(self._to_device(positions))
        lora = any(slots) and self.lora.stacked > 0
        if lora:
            if self._lora_mask is None:
                self._lora_mask = torch.zeros(
                    self.buckets[-1], self.lora.stacked * self.lora.rank, dtype=self.dtype, device=self.device
                )
            self.lora.set(slots + [0] * (size - n), self.dtype, self.device, out=self._lora_mask)
        else:
            self.lora.set([0], self.dtype, self.device)
        key = (size, length, lora)
        if key not in self._graphs:
            self._graphs[key] = self._capture(size, length)
        graph, logits, greedy = self._graphs[key]
        graph.replay()
        host, copied = torch.empty(n, dtype=torch.long, pin_memory=True), torch.cuda.Event()
        step = Step(logits[:n], greedy[:n], host, copied)
        host.copy_(step.greedy, non_blocking=True)
        copied.record()
        return step

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Without waiting for the device: from pinned memory on a GPU."""
        if not self.cuda_graphs:
            return torch.tensor(values, device=self.device)
        return torch.tensor(values, pin_memory=True).to(self.device, non_blocking=True)

    def _decode_pass(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        n = ids.shape[0]
        arange = self._rows[:n] if self.cuda_graphs else torch.arange(n, device=self.device)
        self.cache.decode(arange, positions, length)
        mask = torch.arange(length, device=self.device)[None, :] <= positions[:, None]
        if self.lean is not None:
            return self._logits(self.lean(ids[:, 0], positions, mask, self.cache))
        hidden = self.decoder(
            input_ids=ids,
            position_ids=positions[:, None],
            attention_mask=mask[:, None, None, :],
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        return self._logits(hidden[:, -1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.head(hidden) if self.lean is None else self.lean.logits(hidden)).float()

    def _capture(self, size: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Capture the decode pass of `size` rows. Its warm-up runs do this step's real work: a pass
        writes the same keys and values each time it runs, so running it again changes nothing."""

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            logits = self._decode_pass(self._inputs[0, :size, None], self._inputs[1, :size], length)
            return logits, logits.argmax(-1)

        log.info("capturing a CUDA graph: batch %d, cache length %d", size, length)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits, greedy = run()
        return graph, logits, greedy
