"""Serving benchmark: N concurrent streaming chat clients, the same load against several servers.

Targets, each started here on a free port and stopped after its run:
  bentoservice     `bentoservice start MODEL` with K random LoRA adapters, requests spread over them
  bentoservice-base  the same server, every request on the bare base model (`MODEL:base`)
  naive            bench/naive_server.py: one `generate` per request, one request at a time
  transformers-cb  `transformers serve MODEL_DIR --continuous-batching` (no adapters: base model)
  transformers     `transformers serve MODEL_DIR`

Each client sends ROUNDS requests one after another, more until --min-seconds (default 30) have passed (prompts
from bench/prompts.jsonl, temperature 0, max_tokens fixed) and records when each streamed chunk arrived. Reported
per target: output tokens/s over the whole run, time to first token (TTFT) and inter-token latency (ITL, the gaps
between content chunks) p50/p99, requests that stopped before max_tokens, and the server's peak memory
(resident set of its process tree; GPU memory in use when there is a GPU).

    python bench/serving.py --model smollm2 --streams 16 --max-tokens 64 --adapters 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"
TARGETS = ("bentoservice", "bentoservice-base", "naive", "transformers-cb", "transformers")


@dataclass
class Result:
    """One request as the client saw it."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    tokens: int | None = None  # from the server's usage, when it sends one
    error: str | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the model and its adapters ---------------------------------------------------------------------

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def make_random_model(folder: Path, tokenizer_dir: Path, shape: str) -> Path:
    """A random-weight bf16 model of a known shape (speed does not depend on the weights' values).

    The (tied) embedding rows of special tokens and of ids the tokenizer lacks are zero, so greedy
    decoding picks ordinary tokens: replies stream as text and do not stop early."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[len(tokenizer) :] = 0
        embedding[tokenizer.all_special_ids] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapters(model_dir: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT LoRA adapters on every linear layer, with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [folder / f"a{i + 1}" for i in range(count)]
    if all((p / "adapter_model.safetensors").exists() for p in paths):
        return paths
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"),
    )
    for i, path in enumerate(paths):
        generator = torch.Generator().manual_seed(i + 1)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # A keeps its random init; B (zero at init) makes the adapter count
                param.data = torch.randn(param.shape, generator=generator) * 0.01
        model.save_pretrained(path)
    return paths


def store_model(name: str, model_dir: Path | None) -> Path:
    from bentoservice import store

    if model_dir is not None:
        try:
            return store.resolve_base(name).path
        except store.StoreError:
            return store.import_model(name, str(model_dir)).path
    return store.ensure_base(name).path


def prepare(args: argparse.Namespace, with_adapters: bool = True) -> tuple[Path, list[Path]]:
    """The base model in the store (made first for --random-model) and --adapters random adapters over it."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.random_model:
        args.model_dir = make_random_model(
            args.model_dir or args.work_dir / args.random_model, args.tokenizer, args.random_model
        )
    model_dir = store_model(args.model, args.model_dir)
    if not with_adapters:
        return model_dir, []
    return model_dir, make_adapters(
        model_dir, args.work_dir / f"adapters-{args.model}-r{args.lora_rank}", args.adapters, args.lora_rank
    )


# -- servers ----------------------------------------------------------------------------------------


class Server:
    def __init__(self, cmd: list[str], port: int, model: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.model, self.log = port, model, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 900) -> None:
        """Ready when a one-token chat request succeeds (this also warms the server up)."""
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=300).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def start_server(
    target: str,
    args: argparse.Namespace,
    model_dir: Path,
    adapters: list[Path],
    logs: Path,
    env: dict[str, str] | None = None,
    log_name: str | None = None,
) -> Server:
    """`env`: more settings for a bentoservice target; `log_name`: the log's name when one target runs twice."""
    port = free_port()
    log = logs / f"{log_name or target}.log"
    if target.startswith("bentoservice"):
        cmd = [
            sys.executable,
            "-m",
            "bentoservice.cli",
            "start",
            args.model,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        for i, path in enumerate(adapters):
            cmd += ["--adapter-id", str(path), "--adapter-name", f"a{i + 1}"]
        env = {
            "BENTOSERVICE_MAX_RUNNING": str(max(args.streams, 16)),
            "BENTOML_DO_NOT_TRACK": "True",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        return Server(cmd, port, args.model, log, env)
    if target == "naive":
        return Server(
            [sys.executable, str(ROOT / "bench" / "naive_server.py"), str(model_dir), "--port", str(port)],
            port,
            args.model,
            log,
        )
    cmd = [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--log-level",
        "warning",
    ]
    if target == "transformers-cb":
        cmd.append("--continuous-batching")
    return Server(cmd, port, str(model_dir), log, {"HF_HUB_OFFLINE": "1"})


class MemoryPeak(threading.Thread):
    """Samples the resident memory of a process tree (and the GPU's memory in use) until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.rss = self.gpu = 0
        self._done = threading.Event()
        self._gpu = self._gpu_handle()

    @staticmethod
    def _gpu_handle():
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no GPU, or no NVML: CPU memory only
            return None

    def run(self) -> None:
        while not self._done.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.rss = max(self.rss, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            if self._gpu is not None:
                import pynvml

                self.gpu = max(self.gpu, pynvml.nvmlDeviceGetMemoryInfo(self._gpu).used)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- the load ---------------------------------------------------------------------------------------


def warmup_prompts(count: int) -> list[dict]:
    """Prompts unlike the timed ones, so that no server starts the timed rounds with their prompts cached."""
    return [
        {"messages": [{"role": "user", "content": f"Warm-up request {i}: reply with one word."}]} for i in range(count)
    ]


async def one_request(session, url: str, body: dict) -> Result:
    result = Result(sent=time.perf_counter())
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                result.error = f"{response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        result.chunks.append(time.perf_counter())
                        result.text += content
                    if choice.get("finish_reason"):
                        result.finish = choice["finish_reason"]
    except Exception as exc:  # reported with the results, not raised: one failure should not hide the rest
        result.error = repr(exc)
    return result


async def run_load(
    server: Server,
    prompts: list[dict],
    models: list[str],
    streams: int,
    rounds: int,
    max_tokens: int,
    usage: bool,
    min_seconds: float = 0,
    extra: dict | None = None,
) -> tuple[list[Result], float]:
    """Each client sends `rounds` requests one after another, and more while fewer than `min_seconds` have passed;
    `extra` goes into every request's body."""
    import aiohttp

    async def client(i: int, session) -> list[Result]:
        results: list[Result] = []
        r = 0
        while r < rounds or time.perf_counter() - start < min_seconds:
            n = i + r * streams
            r += 1
            body = {
                "model": models[n % len(models)],
                "messages": prompts[n % len(prompts)]["messages"],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                **(extra or {}),
            }
            if usage:
                body["stream_options"] = {"include_usage": True}
            results.append(await one_request(session, server.url, body))
        return results

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(i, session) for i in range(streams)))
        wall = time.perf_counter() - start
    return [r for results in per_client for r in results], wall


def summarize(results: list[Result], wall: float, max_tokens: int, tokenizer) -> dict:
    def tokens(r: Result) -> int:
        if r.tokens is not None:
            return r.tokens
        if r.finish == "length":
            return max_tokens
        return len(tokenizer(r.text, add_special_tokens=False)["input_ids"])

    ok = [r for r in results if r.error is None and r.chunks]
    ttft = [r.chunks[0] - r.sent for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    total = sum(tokens(r) for r in ok)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "short": sum(1 for r in ok if r.finish != "length"),
        "output_tokens": total,
        "wall_s": wall,
        "tok_s": total / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
    }


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| target | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak memory | short / failed |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target, s in rows.items():
        memory = f"{s['peak_rss_gb']:.2f} GB RSS" + (f", {s['peak_gpu_gb']:.1f} GB GPU" if s.get("peak_gpu_gb") else "")
        lines.append(
            f"| {target} | {s['tok_s']:.1f} | {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} | "
            f"{s['itl_p50_ms']:.0f} / {s['itl_p99_ms']:.0f} | {memory} | {s['short']} / {s['failed']} |"
        )
    return "\n".join(lines)


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """The load's options, shared with bench/adapters.py."""
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another (at least)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=30,
        help="clients keep sending until this long has passed, so that one run is a stable figure",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--warmup-tokens", type=int, default=8, help="max_tokens of an untimed round of every stream first (0: none)"
    )
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds a server may take to start")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bentoservice-bench",
        help="adapters, random models, the model store of bench/adapters.py and server logs (kept between runs)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")


def main() -> None:
    parser = argparse.ArgumentParser(description="Serving benchmark (see the module docstring)")
    parser.add_argument("--model", default="smollm2", help="store name of the base model")
    parser.add_argument("--model-dir", type=Path, help="import this HF folder into the store as --model if missing")
    parser.add_argument(
        "--random-model", choices=sorted(SHAPES), help="make --model-dir as a random-weight model of this shape first"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --random-model")
    add_load_args(parser)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--targets", default="bentoservice,naive,transformers-cb", help=f"comma-separated, from {', '.join(TARGETS)}"
    )
    add_output_args(parser)
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    targets = args.targets.split(",")
    if unknown := set(targets) - set(TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")

    model_dir, adapters = prepare(args, "bentoservice" in targets)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]

    rows: dict[str, dict] = {}
    for target in targets:
        server = start_server(target, args, model_dir, adapters if target == "bentoservice" else [], args.work_dir)
        try:
            server.wait_ready(args.ready_timeout)
            if target == "bentoservice":
                models = [f"a{i + 1}" for i in range(len(adapters))] or [args.model]
            elif target == "bentoservice-base":
                models = [f"{args.model}:base"]
            else:
                models = [server.model]
            usage = target.startswith("bentoservice")
            if args.warmup_tokens:  # every batch size once, so that lazy set-up (CUDA graphs) is not timed
                asyncio.run(
                    run_load(server, warmup_prompts(args.streams), models, args.streams, 1, args.warmup_tokens, usage)
                )
            memory = MemoryPeak(server.proc.pid)
            memory.start()
            results, wall = asyncio.run(
                run_load(server, prompts, models, args.streams, args.rounds, args.max_tokens, usage, args.min_seconds)
            )
            memory.stop()
        finally:
            server.stop()
        rows[target] = {
            **summarize(results, wall, args.max_tokens, tokenizer),
            "peak_rss_gb": memory.rss / 1e9,
            "peak_gpu_gb": memory.gpu / 1e9,
        }
        print(f"{target}: {json.dumps(rows[target])}", flush=True)

    setup = {
        "model": args.model,
        "model_dir": str(model_dir),
        "streams": args.streams,
        "rounds": args.rounds,
        "min_seconds": args.min_seconds,
        "warmup_tokens": args.warmup_tokens,
        "max_tokens": args.max_tokens,
        "adapters": args.adapters,
        "lora_rank": args.lora_rank,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    base = rows.get("transformers-cb")
    print()
    print(table(rows))
    if base and "bentoservice" in rows:
        print(f"\nbentoservice / transformers-cb throughput: {rows['bentoservice']['tok_s'] / base['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
