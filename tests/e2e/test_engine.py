"""The engine under load: the queue limit, cancelled streams, and rows joining and leaving a batch."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import Server

from bentoservice.config import Settings

LONG = 400  # tokens: far more than a test waits for
HELLO = [{"role": "user", "content": "Hello there"}]
STORY = [{"role": "user", "content": "Write a very long story about a lighthouse keeper and his cat."}]


def test_429_beyond_the_queue_limit_and_closed_streams_make_room(smollm2) -> None:
    """One running and one queued: a third request is a 429; when both clients hang up, there is room at once
    (run to the end, the two replies would hold their places for tens of seconds)."""
    server = Server("smollm2", env={"BENTOSERVICE_MAX_RUNNING": "1", "BENTOSERVICE_MAX_QUEUED": "1"})
    body = {"model": "smollm2", "messages": STORY, "max_tokens": LONG, "temperature": 0, "stream": True}
    try:
        with httpx.Client(timeout=60) as http:
            streams = [http.stream("POST", f"{server.url}/v1/chat/completions", json=body) for _ in range(2)]
            lines = [stream.__enter__().iter_lines() for stream in streams]  # kept: dropping one hangs up
            for line in lines:
                next(line)  # the first chunk: the request is running or queued
            with pytest.raises(openai.RateLimitError) as err:
                server.client().chat.completions.create(model="smollm2", messages=HELLO, max_tokens=1)
            assert err.value.body["code"] == "server_overloaded" and "busy" in err.value.body["message"]
            for stream in streams:
                stream.__exit__(None, None, None)
        for _ in range(100):  # the server notices the closed connections within a few steps
            try:
                reply = server.client().chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
                break
            except openai.RateLimitError:
                time.sleep(0.1)
        else:
            pytest.fail("the closed streams did not make room")
        assert reply.usage.completion_tokens == 2
    finally:
        server.stop()


def test_cancelled_stream_frees_its_slot(tiny) -> None:
    """What the API does when a client disconnects: the request leaves the batch at the next step, unfinished."""
    from bentoservice.engine.errors import Overloaded
    from bentoservice.engine.params import Delta, Finished, SamplingParams
    from bentoservice.engine.served import Choice, ServedModel

    served = ServedModel(tiny.name, tiny.model_id, tiny.path, Settings(max_running=2, max_queued=0))

    async def run() -> None:
        prompt = served.encode_text("one two three")
        params = SamplingParams(max_tokens=LONG, temperature=0)
        streams = [served.generate(prompt, params, Choice(None)) for _ in range(2)]
        events = [aiter(stream) for stream in streams]
        for event in events:
            assert isinstance(await anext(event), Delta)
        with pytest.raises(Overloaded):
            served.generate(prompt, params, Choice(None))
        for stream in streams:
            stream.cancel()
        for _ in range(500):
            if served.engine.load == {"running": 0, "waiting": 0}:
                break
            await asyncio.sleep(0.01)
        assert served.engine.load == {"running": 0, "waiting": 0}
        for event in events:  # dropped, not run to the end: no Finished comes
            with pytest.raises(asyncio.TimeoutError):
                while not isinstance(await asyncio.wait_for(anext(event), 0.5), Finished):
                    pass
        done = [e async for e in served.generate(prompt, SamplingParams(max_tokens=3, temperature=0), Choice(None))]
        assert isinstance(done[-1], Finished) and done[-1].completion_tokens == 3

    try:
        asyncio.run(run())
    finally:
        served.close()


def test_rows_joining_and_leaving_do_not_change_the_others(tiny_server: Server) -> None:
    """Requests of different lengths, stop strings and seeds, more than the batch holds: rows leave and
    join mid-batch (and the queued pass behind them), yet each reply is the one it gets alone."""
    client = tiny_server.client()

    def complete(i: int) -> str:
        sampled = {"temperature": 1.0, "seed": i} if i % 3 == 0 else {"temperature": 0}
        return (
            client.completions.create(
                model="tiny",
                prompt=f"number {i} is",
                max_tokens=3 + 5 * i,
                stop=["zz"] if i % 4 == 1 else None,
                **sampled,
            )
            .choices[0]
            .text
        )

    alone = [complete(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, range(8)))
    assert together == alone


def test_a_reused_prefix_gives_what_a_full_prefill_gives(tiny_dir) -> None:
    """A prompt whose beginning is in the prefix store computes only the rest: its logits, and the next decode
    step's, are those of computing it all; another adapter's prompts do not reuse it."""
    import torch
    from transformers import AutoModelForCausalLM

    from bentoservice.engine.adapters import AdapterManager
    from bentoservice.engine.forward import Forward

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    forward = Forward(model, AdapterManager(model, 2, 8).batch, 4, cuda_graphs=False, prefix_bytes=2**24)
    system = list(range(100, 140))
    prompts = [system + [11, 12], system[:20] + [13, 14, 15]]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        first = forward.prefill(prompts, [0, 0], 0)
        return first, forward.decode([5, 6], [len(p) for p in prompts], [0, 0]).logits

    with torch.no_grad():
        forward.prefill([system + [7, 8, 9]], [0], 0)
        assert forward.prefixes.match(0, prompts[0])[1] == 40 and forward.prefixes.match(0, prompts[1])[1] == 20
        assert forward.prefixes.match(1, prompts[0]) == (None, 0)
        reused = run()
        forward.prefixes.clear()
        computed = run()
    for a, b in zip(reused, computed, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
def test_the_lean_pass_gives_the_hf_models_logits(tiny_dir, kernels: str) -> None:
    """On a CPU a Llama runs through the lean pass (fused products, its own decode attention, LoRA grouped by
    adapter; LoRA and RMSNorm in compiled kernels or, where they cannot be built, in torch). Its logits are the HF
    model's on each sequence alone under that sequence's adapter: prompts of different lengths packed in one prefill,
    then decode steps over rows at different lengths with mixed adapters (one on every layer, one on q, v and down
    only, the base), after a row moves, and with one adapter left."""
    import torch
    from transformers import AutoModelForCausalLM

    from bentoservice.engine import native
    from bentoservice.engine.adapters import AdapterManager, PreparedAdapter
    from bentoservice.engine.forward import Forward

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()

    reference, model = load(), load()
    managers = [AdapterManager(reference, 2, 8), AdapterManager(model, 2, 8)]
    forward = Forward(model, managers[1].batch, 4, cuda_graphs=False)
    assert forward.lean is not None and native.kernels() is not None  # this machine has a C compiler
    if kernels == "torch":
        forward.lean.kernels = None
        for group in forward.lean.lora_groups():
            group.kernel = None
    generator = torch.Generator().manual_seed(0)
    linears = [(name, m) for name, m in reference.model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, rank, targets in (("all", 4, ("proj",)), ("some", 8, ("q_proj", "v_proj", "down_proj"))):
        weights = {
            f"model.{path}": (
                torch.randn(rank, m.in_features, generator=generator) * 0.3,
                torch.randn(m.out_features, rank, generator=generator) * 0.3,
            )
            for path, m in linears
            if path.endswith(targets)
        }
        for manager in managers:
            manager.install(PreparedAdapter(name, "random", rank, 2.0 * rank, 2.0, weights))
    forward.adapters_changed()

    def alone(tokens: list[int], slot: int) -> torch.Tensor:
        managers[0].batch.set([slot] * len(tokens), torch.float32, torch.device("cpu"))
        return reference(input_ids=torch.tensor([tokens])).logits[0, -1]

    def check(logits: torch.Tensor, rows: list[tuple[list[int], int]]) -> None:
        expected = torch.stack([alone(tokens, slot) for tokens, slot in rows])
        assert float((logits - expected).norm() / expected.norm()) < 1e-4
        for (tokens, _), token in zip(rows, logits.argmax(-1).tolist(), strict=False):
            tokens.append(token)

    def decode(rows: list[tuple[list[int], int]]) -> None:
        step = forward.decode([t[-1] for t, _ in rows], [len(t) - 1 for t, _ in rows], [s for _, s in rows])
        check(step.logits, rows)

    rows = [(list(range(100, 100 + n)), slot) for n, slot in ((5, 2), (17, 0), (9, 1), (30, 2))]
    with torch.no_grad():
        check(forward.prefill([t for t, _ in rows], [s for _, s in rows], 0), rows)
        for _ in range(2):
            decode(rows)
        forward.move_rows([3], [2])  # row 2 finished: the last row takes its place
        rows = rows[:2] + rows[3:]
        for _ in range(2):  # the base and the second adapter only
            decode(rows)
        for _ in range(2):  # one adapter in the batch
            decode(rows[:1])
