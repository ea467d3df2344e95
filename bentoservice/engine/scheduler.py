"""Continuous batching: requests join and leave the running batch at every decode step.

One engine thread owns the model. Each step it admits waiting requests (their prompts packed into
one prefill pass, up to a token budget), then runs one decode pass over every running sequence,
each with its own KV row, position and LoRA adapter. Tokens go back to the callers' asyncio loops as
they are produced, in one hand-over per loop and step.
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
from bentoservice.engine.errors import Overloaded, UnknownAdapter
from bentoservice.engine.forward import Forward
from bentoservice.engine.params import Delta, Event, Failed, Finished, SamplingParams
from bentoservice.engine.sampling import make_generator, next_tokens
from bentoservice.engine.text import TextTracker

log = logging.getLogger(__name__)


class Stream:
    """The caller's side of one request: an async iterator of events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def put(self, event: Event) -> None:
        """On the stream's loop."""
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            # A consumer that fell behind gets the text waiting for it as one delta.
            while isinstance(event, Delta) and not self._queue.empty():
                following = self._queue.get_nowait()
                if not isinstance(following, Delta):
                    yield event
                    event = following
                    break
                event = Delta(event.text + following.text)
            yield event
            if not isinstance(event, Delta):
                return


def _deliver(items: list[tuple[Stream, Event]]) -> None:
    for stream, event in items:
        stream.put(event)


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
        self.max_running, self.max_queued = max_running, max_queued
        self.prefill_token_budget = prefill_token_budget
        self.adapters = AdapterManager(model, max_loras, max_lora_rank)
        device = next(model.parameters()).device
        self.forward = Forward(model, self.adapters.batch, max_running, cuda_graphs=device.type == "cuda")
        self.max_length = int(model.config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._outbox: list[tuple[Stream, Event]] = []
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
                self._drop_cancelled()
                if new := self._admit():
                    self._prefill(new)
                if self._running:
                    self._decode_step()
            except Exception as exc:  # a failed pass fails the requests in it, not the server
                log.exception("engine step failed")
                self._fail_all(f"generation failed: {exc}")
            self._flush()

    def _run_command(self, fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)
        finally:  # commands change adapters: captured passes must see the new stacks
            self.forward.adapters_changed()

    def _emit(self, seq: Sequence, event: Event) -> None:
        self._outbox.append((seq.stream, event))

    def _flush(self) -> None:
        """Hand this step's events to their loops: one call per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Event]]] = {}
        for stream, event in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream, event))
        self._outbox.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass

    def _fail_all(self, message: str) -> None:
        for seq in self._running:
            self._emit(seq, Failed(message))
        self._running.clear()
        self.forward.idle()

    def _drop_cancelled(self) -> None:
        for seq in self._running:
            if seq.stream.cancelled:
                seq.done = True
        self._retire()

    def _admit(self) -> list[Sequence]:
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
                    self._emit(seq, Failed(f"the adapter {seq.adapter!r} was unloaded"))
                    continue
                new.append(seq)
        return new

    def _prefill(self, new: list[Sequence]) -> None:
        logits = self.forward.prefill([s.prompt for s in new], [s.slot for s in new], len(self._running))
        self._running.extend(new)
        self._accept_all(new, logits, None)

    def _decode_step(self) -> None:
        running = self._running
        logits, greedy = self.forward.decode([s.generated[-1] for s in running], [s.position for s in running],
                                             [s.slot for s in running])
        self._accept_all(running, logits, greedy)

    def _accept_all(self, seqs: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor | None) -> None:
        tokens = next_tokens(logits, [(s.params, s.generator) for s in seqs], greedy)
        for seq, token in zip(seqs, tokens):
            self._accept(seq, token)
        self._retire()

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if token in self.eos_ids:
            return self._finish(seq, "stop")
        delta = seq.text.add(token)
        if delta:
            self._emit(seq, Delta(delta))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.params.max_tokens or seq.position + 1 >= self.max_length:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        rest = seq.text.flush()
        if rest:
            self._emit(seq, Delta(rest))
        self._emit(seq, Finished(reason, len(seq.prompt), len(seq.generated)))
        seq.done = True

    def _retire(self) -> None:
        """Drop finished rows, moving the last row into each gap so rows stay contiguous."""
        running = self._running
        for row in range(len(running) - 1, -1, -1):
            if running[row].done:
                last = len(running) - 1
                if row != last:
                    self.forward.move_row(last, row)
                    running[row] = running[last]
                running.pop()
        if not running:
            self.forward.idle()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
