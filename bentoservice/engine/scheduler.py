"""Continuous batching: requests join and leave the running batch at every decode step.

One engine thread owns the model. Each step it admits waiting requests (their prompts packed into
one prefill pass, up to a token budget), then runs one decode pass over every running sequence,
each with its own KV row, position and LoRA adapter. Tokens go back to the callers' asyncio loops as
they are produced, in one hand-over per loop and step.

While nothing is waiting and every running request decodes greedily, the next decode pass is queued
on the device, fed by the device-side tokens of the pass before, before that pass's tokens are read
and handled: the host's work on one step (detokenising, stop strings, streaming) overlaps the
device's work on the next. A request that finished meanwhile costs its row one wasted token.

A request under a grammar (structured outputs, see grammar.py) has its rows' logits masked after each pass, before
sampling; those rows read every pass on the host, so a batch holding one is never chained.

It is one module of about 500 lines because admission, the chained decode and retirement share the engine
thread's state (rows, KV slots, pending passes) and must change together; split, each part would reach into the
others' fields.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bentoservice.engine import metrics
from bentoservice.engine.adapters import AdapterManager, NoFreeSlot, PreparedAdapter
from bentoservice.engine.errors import Overloaded
from bentoservice.engine.forward import Chained, Forward, Step
from bentoservice.engine.grammar import Grammars, Matcher
from bentoservice.engine.params import Delta, Event, Failed, Finished, SamplingParams, TokenLogprob
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
                event = event.then(following)
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
    matcher: Matcher | None = None  # the grammar's state, for a constrained row
    slot: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False
    pending: int = 0  # decode passes queued for it whose token is not read yet
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def position(self) -> int:
        """Where the last token read goes in the cache."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def next_position(self) -> int:
        """Where the input token of the next pass goes: the last token read, or the last one queued."""
        return self.position + self.pending


@dataclass
class Launched:
    """A decode pass on the device and the sequences of its rows, in order."""

    step: Step
    seqs: list[Sequence]


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_running: int,
        max_queued: int,
        prefill_token_budget: int | None,
        max_loras: int,
        max_lora_rank: int,
        prefix_cache_bytes: int = 0,
        max_cpu_loras: int = 0,
        adapter_wait_s: float = 30.0,
        read_adapter: Callable[[str], PreparedAdapter] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_running, self.max_queued = max_running, max_queued
        self.adapters = AdapterManager(model, max_loras, max_lora_rank, max_cpu_loras)
        self.adapter_wait_s = adapter_wait_s
        self.read_adapter = read_adapter  # an adapter's name -> its weights, read from disk (on the loader thread)
        self._loading: dict[str, concurrent.futures.Future[PreparedAdapter]] = {}
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self._blocked = False  # the last admission left every waiting request waiting for an adapter
        device = next(model.parameters()).device
        self.prefill_token_budget = prefill_token_budget or (4096 if device.type == "cuda" else 256)
        self.forward = Forward(
            model, self.adapters.batch, max_running, cuda_graphs=device.type == "cuda", prefix_bytes=prefix_cache_bytes
        )
        self.adapters.forget = self.forward.prefixes.drop
        if device.type == "cuda":
            # A step waits on the GPU with the GIL released; it must get it back from the HTTP thread
            # promptly (Python's default switch interval, 5 ms, is about as long as a step).
            sys.setswitchinterval(0.001)
        self.max_length = int(model.config.max_position_embeddings)
        self.eos_ids = self._eos_ids()
        self.grammars = Grammars(tokenizer, int(model.config.vocab_size), self.eos_ids, max_running)
        self._waiting: collections.deque[list[Sequence]] = collections.deque()  # groups: n choices of a prompt
        self._running: list[Sequence] = []
        self._admitted = 0  # taken from the queue, in the prefill pass under way
        self._inflight: Launched | None = None
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
        return self.submit_choices(prompt, [params], adapter)[0]

    def submit_choices(self, prompt: list[int], choices: list[SamplingParams], adapter: str | None) -> list[Stream]:
        """Several completions of one prompt (OpenAI's `n`): one prefill, its keys and values copied to
        the other rows. They are admitted together, so `len(choices)` must not exceed `max_running`. An adapter in no
        slot is loaded first (off the step loop) while other requests run."""
        if adapter is not None:
            tier = self.adapters.tier(adapter)
            metrics.REQUESTS.labels(tier).inc()
            if tier == "disk":
                self.fetch(adapter)
        loop = asyncio.get_running_loop()
        group = [
            Sequence(
                prompt,
                params,
                adapter,
                Stream(loop),
                TextTracker(self._decode, params.stop),
                make_generator(params.seed),
                None if params.grammar is None else self.grammars.matcher(params.grammar),
            )
            for params in choices
        ]
        with self._cv:
            if self._count() + len(group) > self.max_running + self.max_queued:
                raise Overloaded(
                    f"the server is busy: {self.max_running} running and {self.max_queued} queued requests at most"
                )
            self._waiting.append(group)
            self._cv.notify()
        return [seq.stream for seq in group]

    def _count(self) -> int:
        return sum(map(len, self._waiting)) + len(self._running) + self._admitted

    def fetch(self, name: str) -> None:
        """Read an adapter into the host tier on the loader thread; one read however many ask for it at once."""
        with self._cv:  # the engine thread moves reads into the host tier under this lock
            if name in self._loading or self.adapters.tier(name) != "disk":
                return
            future = self._loading[name] = self._loader.submit(self._read_from_disk, name)
            future.add_done_callback(lambda _: self._wake())

    def _read_from_disk(self, name: str) -> PreparedAdapter:
        if self.read_adapter is None:
            raise LookupError(f"no adapter {name!r} is loaded, and this engine reads none from disk")
        started = time.perf_counter()
        prepared = self.read_adapter(name)
        metrics.LOAD_SECONDS.labels("disk").observe(time.perf_counter() - started)
        metrics.LOADS.labels("disk").inc()
        return prepared

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def busy(self, *more: list[list[Sequence]]) -> set[str | None]:
        """The adapters that running or queued requests name (engine thread)."""
        return {s.adapter for s in self._running} | {g[0].adapter for groups in (self._waiting, *more) for g in groups}

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
        self._loader.shutdown(wait=False, cancel_futures=True)

    @property
    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self._running) + self._admitted, "waiting": sum(map(len, self._waiting))}

    # -- engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                if self._blocked and not (self._stopping or self._commands or self._running or self._inflight):
                    self._cv.wait(timeout=0.05)  # until a load ends or a request comes (and deadlines pass)
                while not (self._stopping or self._commands or self._waiting or self._running or self._inflight):
                    self._cv.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            try:
                if commands and self._inflight is not None:  # a command may change what the pass reads
                    inflight, self._inflight = self._inflight, None
                    self._read(inflight)
                for fn, future in commands:
                    self._run_command(fn, future)
                self._step()
            except Exception as exc:  # a failed pass fails the requests in it, not the server
                log.exception("engine step failed")
                self._inflight = None
                self._fail_all(f"generation failed: {exc}")
            self._flush()

    def _step(self) -> None:
        previous, self._inflight = self._inflight, None
        if previous is not None:
            if self._may_chain():
                self._inflight = self._launch(previous)
            self._read(previous)
            if self._inflight is not None:
                return
        self._drop_cancelled()
        if new := self._admit():
            self._prefill(new)
        if self._running:
            self._inflight = self._launch(None)

    def _may_chain(self) -> bool:
        """Whether the next pass can be queued before the tokens of the one in flight are read."""
        if self._commands or (self._waiting and len(self._running) < self.max_running):
            return False
        running = self._running
        if any(
            s.stream.cancelled or s.params.temperature > 0 or s.params.per_row or s.next_position + 1 >= self.max_length
            for s in running
        ):
            return False
        return any(len(s.generated) + s.pending < s.params.max_tokens for s in running)

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

    def _admit(self) -> list[list[Sequence]]:
        """Groups taken from the queue in order, each one prompt, admitted whole, while rows and the token budget
        last; one whose adapter is not in a slot yet (still loading, or every slot busy) stays queued without
        holding up those behind it."""
        new: list[list[Sequence]] = []
        waiting: list[list[Sequence]] = []
        budget = self.prefill_token_budget
        with self._cv:
            self._take_loaded()
            admitted = 0
            while self._waiting:
                group = [s for s in self._waiting[0] if not s.stream.cancelled]
                if not group:
                    self._waiting.popleft()
                    continue
                prompt = group[0].prompt
                if len(self._running) + admitted + len(group) > self.max_running or (new and len(prompt) > budget):
                    break
                self._waiting.popleft()
                slot = self._slot(group[0].adapter, new, waiting)
                if slot is None:
                    if time.monotonic() - group[0].queued_at > self.adapter_wait_s:
                        for seq in group:
                            self._emit(
                                seq,
                                Failed(
                                    f"every adapter slot stayed busy for {self.adapter_wait_s:g} s: retry later",
                                    429,
                                    "adapter_slots_busy",
                                ),
                            )
                    else:
                        waiting.append(group)
                    continue
                budget -= len(prompt)
                for seq in group:
                    seq.slot = slot
                new.append(group)
                admitted += len(group)
            self._waiting.extendleft(reversed(waiting))
            self._blocked = bool(waiting) and not new
            self._admitted = admitted
        return new

    def _take_loaded(self) -> None:
        """Adapters read since the last step go to the host tier; a read that failed fails its requests."""
        for name in [name for name, future in self._loading.items() if future.done()]:
            future = self._loading.pop(name)
            exc = future.exception()
            if exc is None:
                self.adapters.to_host(future.result(), self.busy().__contains__)
                continue
            status = 404 if isinstance(exc, LookupError) else 400
            for group in [g for g in self._waiting if g[0].adapter == name]:
                self._waiting.remove(group)
                for seq in group:
                    self._emit(
                        seq, Failed(f"the adapter {name!r} could not be loaded: {exc}", status, "invalid_adapter")
                    )

    def _slot(self, name: str | None, new: list[list[Sequence]], waiting: list[list[Sequence]]) -> int | None:
        """The slot of an adapter, copied in from the host tier (evicting an idle one) if need be; None while it is
        not readable yet or every slot is busy."""
        adapters = self.adapters
        if name is None:
            return 0
        if name in adapters.loaded:
            return adapters.touch(name)
        if name not in adapters.host:
            if name not in self._loading:  # left the host tier while it waited
                self.fetch(name)
            return None
        started = time.perf_counter()
        try:
            loaded = adapters.install(adapters.host[name], in_use=self.busy(new, waiting).__contains__)
        except NoFreeSlot:
            return None
        self.forward.slot_rewritten(loaded.slot)
        metrics.LOAD_SECONDS.labels("cpu").observe(time.perf_counter() - started)
        metrics.LOADS.labels("cpu").inc()
        return loaded.slot

    def _prefill(self, groups: list[list[Sequence]]) -> None:
        """One pass over each group's prompt; the group's other rows get copies of its keys and values."""
        row0 = len(self._running)
        leaders = [group[0] for group in groups]
        followers = [(i, seq) for i, group in enumerate(groups) for seq in group[1:]]
        new = leaders + [seq for _, seq in followers]
        try:
            logits = self.forward.prefill([s.prompt for s in leaders], [s.slot for s in leaders], row0)
            if followers:
                row = row0 + len(leaders)
                for i, group in enumerate(groups):
                    self.forward.fork(row0 + i, list(range(row, row + len(group) - 1)), len(group[0].prompt))
                    row += len(group) - 1
                source = list(range(len(leaders))) + [i for i, _ in followers]
                logits = logits.index_select(0, torch.tensor(source, device=logits.device))
        finally:
            with self._cv:
                self._running.extend(new)
                self._admitted = 0
        self.grammars.constrain(logits, new)
        tokens, logprobs = next_tokens(logits, new, self.eos_ids)
        for seq, token, logprob in zip(new, tokens, logprobs, strict=False):
            self._accept(seq, token, logprob)
        self._retire()

    def _launch(self, previous: Launched | None) -> Launched:
        """Queue a decode pass over the running sequences; with `previous`, fed by its device-side tokens."""
        running = list(self._running)
        if previous is None:
            tokens: list[int] | Chained = [s.generated[-1] for s in running]
        else:
            row = {id(s): i for i, s in enumerate(previous.seqs)}
            tokens = Chained(previous.step, [row[id(s)] for s in running])
        step = self.forward.decode(tokens, [s.next_position for s in running], [s.slot for s in running])
        for seq in running:
            seq.pending += 1
        return Launched(step, running)

    def _read(self, launched: Launched) -> None:
        """Wait for a pass, then handle its tokens (a sequence that finished since it was queued ignores its own)."""
        seqs = launched.seqs
        step = launched.step
        masked = self.grammars.constrain(step.logits, seqs)  # the pass's own argmax then no longer holds
        tokens, logprobs = next_tokens(step.logits, seqs, self.eos_ids, None if masked else step.greedy_tokens())
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=False):
            seq.pending -= 1
            if not seq.done:
                self._accept(seq, token, logprob)
        self._retire()

    def _accept(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        seq.generated.append(token)
        params = seq.params
        matched = seq.matcher is not None and seq.matcher.accept_token(token) and seq.matcher.is_terminated()
        if matched or (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            if logprob is not None:
                self._emit(seq, Delta("", (logprob,)))
            return self._finish(seq, "stop")
        delta = seq.text.add(token)
        if delta or logprob is not None:
            self._emit(seq, Delta(delta, () if logprob is None else (logprob,)))
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
        """Drop finished rows, moving the last rows into the gaps so rows stay contiguous (one copy for all)."""
        running = self._running
        rows = list(range(len(running)))  # the cache row each entry of `running` is in
        for row in range(len(running) - 1, -1, -1):
            if running[row].done:
                running[row], rows[row] = running[-1], rows[-1]
                running.pop()
                rows.pop()
        moved = [(src, dst) for dst, src in enumerate(rows) if src != dst]
        if moved:
            self.forward.move_rows([src for src, _ in moved], [dst for _, dst in moved])
        if not running:
            self.forward.idle()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
