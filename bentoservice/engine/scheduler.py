"""Continuous batching: requests join and leave the running batch at every decode step.

One engine thread owns the model. Each step it admits waiting requests (one padded prefill pass),
then runs one decode pass over every running sequence, each with its own KV row, position and
LoRA adapter. Tokens go back to the caller's asyncio loop as they are produced.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bentoservice.engine.adapters import AdapterManager
from bentoservice.engine.cache import SlotCache
from bentoservice.engine.errors import Overloaded, UnknownAdapter
from bentoservice.engine.params import Delta, Event, Failed, Finished, SamplingParams
from bentoservice.engine.sampling import make_generator, sample
from bentoservice.engine.text import TextTracker

log = logging.getLogger(__name__)


class Stream:
    """The caller's side of one request: an async iterator of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def push(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    stream: Stream
    text: TextTracker
    generator: torch.Generator
    slot: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def position(self) -> int:
        """Where the next input token (the last one sampled) goes in the cache."""
        return len(self.prompt) + len(self.generated) - 1


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_running: int, max_queued: int,
                 prefill_token_budget: int, max_loras: int, max_lora_rank: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.max_running, self.max_queued = max_running, max_queued
        self.prefill_token_budget = prefill_token_budget
        self.adapters = AdapterManager(model, max_loras, max_lora_rank)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache = SlotCache(config.num_hidden_layers, kv_heads, head_dim, model.dtype, self.device)
        self.max_length = int(config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    # -- thread-safe API ----------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, adapter: str | None) -> Stream:
        if adapter is not None and adapter not in self.adapters.loaded:
            raise UnknownAdapter(adapter)
        stream = Stream(asyncio.get_running_loop())
        seq = Sequence(prompt, params, adapter, stream, TextTracker(self._decode, params.stop),
                       make_generator(params.seed))
        with self._cv:
            if len(self._waiting) + len(self._running) >= self.max_running + self.max_queued:
                raise Overloaded(f"the server is busy: {self.max_running} running and "
                                 f"{self.max_queued} queued requests at most")
            self._waiting.append(seq)
            self._cv.notify()
        return stream

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between two steps (for changes to the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    # -- engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._commands or self._waiting or self._running):
                    self._cv.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                self._run_command(fn, future)
            try:
                self._admit()
                if self._running:
                    self._decode_step()
            except Exception as exc:  # a failed pass fails the requests in it, not the server
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {exc}")

    @staticmethod
    def _run_command(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _fail_all(self, message: str) -> None:
        for seq in self._running:
            seq.stream.push(Failed(message))
        self._running.clear()
        self.cache.clear()

    def _admit(self) -> None:
        new: list[Sequence] = []
        budget = self.prefill_token_budget
        with self._cv:
            while self._waiting and len(self._running) + len(new) < self.max_running:
                seq = self._waiting[0]
                if seq.stream.cancelled:
                    self._waiting.popleft()
                    continue
                if new and len(seq.prompt) > budget:
                    break
                self._waiting.popleft()
                budget -= len(seq.prompt)
                try:
                    seq.slot = self.adapters.slot(seq.adapter)
                except UnknownAdapter:
                    seq.stream.push(Failed(f"the adapter {seq.adapter!r} was unloaded"))
                    continue
                new.append(seq)
        if new:
            self._prefill(new)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 slots: list[int]) -> torch.Tensor:
        self.adapters.batch.set(slots, self.device)
        out = self.decoder(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                           past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state

    def _prefill(self, new: list[Sequence]) -> None:
        row0, n = len(self._running), len(new)
        longest = max(len(s.prompt) for s in new)
        ids = torch.zeros((n, longest), dtype=torch.long)
        for i, seq in enumerate(new):
            ids[i, : len(seq.prompt)] = torch.tensor(seq.prompt)
        positions = torch.arange(longest, device=self.device).expand(n, longest)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        self.cache.reserve(row0 + n, longest + 1)
        self.cache.begin(row0, positions[:, 0], longest, prefill=True)
        hidden = self._forward(ids.to(self.device), positions, causal.expand(n, 1, longest, longest),
                               [s.slot for s in new])
        last = torch.tensor([len(s.prompt) - 1 for s in new], device=self.device)
        logits = self.head(hidden[torch.arange(n, device=self.device), last]).float().cpu()
        self._running.extend(new)
        for seq, row in zip(new, logits):
            self._accept(seq, sample(row, seq.params, seq.generator))
        self._retire()

    def _decode_step(self) -> None:
        running = self._running
        for seq in running:
            if seq.stream.cancelled:
                seq.done = True
        self._retire()
        if not running:
            return
        n = len(running)
        positions = torch.tensor([s.position for s in running], device=self.device)
        end = int(max(s.position for s in running)) + 1
        self.cache.reserve(n, end)
        self.cache.begin(0, positions, end, prefill=False)
        mask = torch.arange(end, device=self.device)[None, :] <= positions[:, None]
        tokens = torch.tensor([[s.generated[-1]] for s in running], device=self.device)
        hidden = self._forward(tokens, positions[:, None], mask[:, None, None, :], [s.slot for s in running])
        logits = self.head(hidden[:, -1]).float().cpu()
        for seq, row in zip(running, logits):
            self._accept(seq, sample(row, seq.params, seq.generator))
        self._retire()

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if token in self.eos_ids:
            return self._finish(seq, "stop")
        delta = seq.text.add(token)
        if delta:
            seq.stream.push(Delta(delta))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_tokens or seq.position + 1 >= self.max_length:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        rest = seq.text.flush()
        if rest:
            seq.stream.push(Delta(rest))
        seq.stream.push(Finished(reason, len(seq.prompt), len(seq.generated)))
        seq.done = True

    def _retire(self) -> None:
        """Drop finished rows, moving the last row into each gap so rows stay contiguous."""
        running = self._running
        for row in range(len(running) - 1, -1, -1):
            if running[row].done:
                last = len(running) - 1
                if row != last:
                    self.cache.move_row(last, row)
                    running[row] = running[last]
                running.pop()
        if not running:
            self.cache.clear()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

