"""The product's whole loop on one machine, timed: upload -> fine-tune -> hot-load -> serve, under load.

One `bentoservice start` serves a base model with K random LoRA adapters while STREAMS streaming clients keep
asking them for chat completions. Meanwhile the script generates a chat file, uploads it and creates a fine-tuning
job through the official openai SDK, follows the job, and asks the new adapter for a streamed reply as soon as it
is listed. Recorded:

  timeline   upload accepted, job running, first training step, job succeeded, adapter listed, first token
             from the new adapter (seconds from the upload)
  training   tokens/s per logged step and MFU (4 x parameters x tokens/s over --peak-tflops: LoRA's forward and
             activation gradients, no weight gradients of the base)
  load       the background streams' output tok/s and TTFT p50/p99 before, during and after the job
  memory     peak GPU memory of the serving process and of the training process (NVML per process), and of the
             device as a whole

    python bench/e2e.py --model tinyb --random-model tiny --tokenizer TOKENIZER_DIR --examples 200 --phase-s 5
    python bench/e2e.py --model llama1b --random-model llama-3.2-1b --tokenizer TOKENIZER_DIR  # add --load-in-4bit
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import (  # noqa: E402  (bench/serving.py: the model, adapters, server and one streamed request)
    PROMPTS,
    SHAPES,
    MemoryPeak,
    Result,
    Server,
    free_port,
    one_request,
    prepare,
)

WORDS = (
    "the model learns a small habit from every example it sees and repeats it when asked again later "
    "adapters are cheap to train and cheap to serve beside each other on one card"
).split()


def chat_file(count: int, seed: int = 0) -> bytes:
    """`count` chats whose replies all open the same way (a habit the adapter can learn), 20-300 words long."""
    rng = np.random.default_rng(seed)
    prompts = [json.loads(line)["messages"][-1]["content"] for line in PROMPTS.read_text().splitlines() if line]
    rows = []
    for i in range(count):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 300))))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{prompts[i % len(prompts)]} (#{i})"},
                    {"role": "assistant", "content": f"Certainly, friend. {words}."},
                ]
            }
        )
    return "\n".join(json.dumps(row) for row in rows).encode()


# -- the background load ------------------------------------------------------------------------------


class Load(threading.Thread):
    """STREAMS clients, each sending one streamed request after another over `models` until stopped."""

    def __init__(self, url: str, models: list[str], streams: int, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.models, self.streams, self.max_tokens = url, models, streams, max_tokens
        self.results: list[Result] = []
        self._halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp

        prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]

        async def client(i: int, session) -> None:
            n = i
            while not self._halt.is_set():
                body = {
                    "model": self.models[n % len(self.models)],
                    "messages": prompts[n % len(prompts)]["messages"],
                    "max_tokens": self.max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                self.results.append(await one_request(session, self.url, body))
                n += self.streams

        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(*(client(i, session) for i in range(self.streams)))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def window(self, start: float, end: float) -> dict:
        """Output tok/s of the chunks that arrived in [start, end) (each request's tokens spread evenly over its
        chunks) and TTFT of the requests sent in it."""
        tokens, ttft, failed = 0.0, [], 0
        for r in self.results:
            if r.error is not None:
                failed += start <= r.sent < end
                continue
            if not r.chunks:
                continue
            share = (r.tokens or len(r.chunks)) / len(r.chunks)
            tokens += share * sum(1 for t in r.chunks if start <= t < end)
            if start <= r.sent < end:
                ttft.append(r.chunks[0] - r.sent)
        pct = lambda q: float(np.percentile(ttft, q)) if ttft else float("nan")  # noqa: E731
        return {
            "seconds": end - start,
            "tok_s": tokens / (end - start),
            "requests": len(ttft),
            "failed": failed,
            "ttft_p50_s": pct(50),
            "ttft_p99_s": pct(99),
        }


class ProcessMemory(threading.Thread):
    """Peak GPU memory per process (NVML) and of the device, sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[int, int] = {}
        self.device = 0
        self._done = threading.Event()
        self._handle = MemoryPeak._gpu_handle()

    def run(self) -> None:
        import pynvml

        while self._handle is not None and not self._done.wait(0.2):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), proc.usedGpuMemory or 0)
            self.device = max(self.device, pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def stop(self) -> None:
        self._done.set()
        self.join()


# -- the job --------------------------------------------------------------------------------------------


def first_token(base_url: str, model: str) -> tuple[float, str]:
    """Seconds to the first streamed content of one chat request to `model`, and the reply."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    start = time.perf_counter()
    first, text = None, ""
    for chunk in client.chat.completions.create(
        model=model,
        stream=True,
        max_tokens=32,
        temperature=0,
        messages=[{"role": "user", "content": "Tell me about adapters."}],
    ):
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            first = first or time.perf_counter()
            text += content
    return (first or time.perf_counter()) - start, text


def run_job(server: Server, args: argparse.Namespace, params: int, marks: dict[str, float]) -> dict:
    """Upload, create, follow; `marks` gets each moment of the timeline (perf_counter)."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    data = chat_file(args.examples)
    marks["upload sent"] = time.perf_counter()
    uploaded = client.files.create(file=("chats.jsonl", io.BytesIO(data)), purpose="fine-tune")
    marks["upload accepted"] = time.perf_counter()
    extra = {"load_in_4bit": True} if args.load_in_4bit else {}
    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=uploaded.id,
        suffix="e2e",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size}},
        },
        extra_body={"logging_steps": 1, **extra},
    )
    marks["job created"] = time.perf_counter()
    steps: list[dict] = []
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        now = time.perf_counter()
        if job.status == "running":
            marks.setdefault("job running", now)
        for event in client.fine_tuning.jobs.list_events(job.id, limit=100).data:
            if event.id in seen:
                continue
            seen.add(event.id)
            if event.type == "metrics" and event.data and "tokens_per_second" in event.data:
                marks.setdefault("first training step", now)
                steps.append({"at": now, **event.data})
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} {job.status}: {job.error}")
    marks["job succeeded"] = time.perf_counter()
    while job.fine_tuned_model not in [m.id for m in client.models.list().data]:
        time.sleep(0.1)
    marks["adapter listed"] = time.perf_counter()
    ttft, reply = first_token(f"{server.url}/v1", job.fine_tuned_model)
    marks["first token from the new adapter"] = marks["adapter listed"] + ttft
    rates = [s["tokens_per_second"] for s in steps[1:]] or [s["tokens_per_second"] for s in steps]
    median = float(np.median(rates)) if rates else float("nan")
    return {
        "job": job.id,
        "fine_tuned_model": job.fine_tuned_model,
        "examples": args.examples,
        "trained_tokens": job.trained_tokens,
        "steps": len(steps),
        "reply": reply,
        "tokens_per_second_median": median,
        "mfu_median": 4 * params * median / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        "step_log": [
            {k: v for k, v in s.items() if k != "at"} | {"at_s": s["at"] - marks["upload sent"]} for s in steps
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="The whole loop, timed (see the module docstring)")
    parser.add_argument("--model", default="llama1b", help="store name of the base model")
    parser.add_argument("--model-dir", type=Path, help="import this HF folder into the store as --model if missing")
    parser.add_argument("--random-model", choices=sorted(SHAPES), help="make --model-dir as a random-weight model")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --random-model")
    parser.add_argument("--streams", type=int, default=64, help="background streaming clients")
    parser.add_argument("--adapters", type=int, default=4, help="random adapters the background load uses")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each background request")
    parser.add_argument("--phase-s", type=float, default=20, help="seconds of load measured before and after the job")
    parser.add_argument("--examples", type=int, default=3000, help="chats in the generated training file")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the job's base in 4-bit (bitsandbytes)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="for MFU (default: 989, the H100's dense bf16, when there is a GPU)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bentoservice-bench")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.peak_tflops is None and torch.cuda.is_available():
        args.peak_tflops = 989.0

    model_dir, adapters = prepare(args)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    params = _parameters(config)

    port = free_port()
    cmd = [sys.executable, "-m", "bentoservice.cli", "start", args.model, "--port", str(port), "--host", "127.0.0.1"]
    for i, path in enumerate(adapters):
        cmd += ["--adapter-id", str(path), "--adapter-name", f"a{i + 1}"]
    env = {"BENTOSERVICE_MAX_RUNNING": str(args.streams + 8), "BENTOSERVICE_DATA_DIR": str(args.work_dir / "e2e-data")}
    server = Server(cmd, port, args.model, args.work_dir / "e2e-server.log", env)
    memory = ProcessMemory()
    try:
        server.wait_ready()
        serving_pids = {
            p.pid for p in [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        }
        load = Load(server.url, [f"a{i + 1}" for i in range(len(adapters))], args.streams, args.max_tokens)
        load.start()
        memory.start()
        time.sleep(min(10.0, args.phase_s))  # every batch size once, CUDA graphs captured: not measured
        before = time.perf_counter()
        time.sleep(args.phase_s)
        marks: dict[str, float] = {}
        job = run_job(server, args, params, marks)
        time.sleep(args.phase_s)
        end = time.perf_counter()
        load.stop()
        memory.stop()
    finally:
        server.stop()

    origin = marks["upload sent"]
    train_start = marks.get("first training step", marks.get("job running", origin))
    windows = {
        "before": load.window(before, origin),
        "during training": load.window(train_start, marks["job succeeded"]),
        "after": load.window(marks["first token from the new adapter"], end),
    }
    gib = 2**30
    serving_gpu = sum(v for pid, v in memory.peak.items() if pid in serving_pids)
    training_gpu = max((v for pid, v in memory.peak.items() if pid not in serving_pids), default=0)
    result = {
        "setup": {
            "model": args.model,
            "random_model": args.random_model,
            "parameters": params,
            "streams": args.streams,
            "adapters": args.adapters,
            "max_tokens": args.max_tokens,
            "examples": args.examples,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "adapter_type": "qlora" if args.load_in_4bit else "lora",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "timeline_s": {k: round(v - origin, 3) for k, v in marks.items()},
        "training": {k: v for k, v in job.items() if k != "step_log"},
        "load": windows,
        "peak_gpu_gib": {
            "serving process": serving_gpu / gib,
            "training process": training_gpu / gib,
            "device": memory.device / gib,
        },
        "step_log": job["step_log"],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "step_log"}, indent=2))
    print(table(result))


def _parameters(config) -> int:
    """The decoder's parameter count from its config (tied embeddings counted once)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return layers * per_layer + embeddings + h


def table(result: dict) -> str:
    t, train = result["timeline_s"], result["training"]
    lines = ["| moment | s from upload |", "| --- | ---: |", *(f"| {k} | {v:.2f} |" for k, v in t.items())]
    mfu = f", MFU {train['mfu_median']:.1%}" if train["mfu_median"] is not None else ""
    lines += [
        "",
        f"training: {train['tokens_per_second_median']:,.0f} tokens/s (median of {train['steps']} steps)"
        f"{mfu}, {train['trained_tokens']} tokens",
        "",
        "| load window | output tok/s | TTFT p50 / p99 (s) | requests |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, w in result["load"].items():
        lines.append(
            f"| {name} | {w['tok_s']:,.0f} | {w['ttft_p50_s']:.2f} / {w['ttft_p99_s']:.2f} | "
            f"{w['requests']} ({w['failed']} failed) |"
        )
    peak = result["peak_gpu_gib"]
    lines.append("\npeak GPU GiB: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
