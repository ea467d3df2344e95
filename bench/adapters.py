"""Adapters on demand: many more adapters than slots, against the same load with every adapter resident.

Two servers of `bentoservice start MODEL`, one after the other, under the same load as bench/serving.py (its load
generator: N streaming chat clients, temperature 0, max_tokens fixed, until --min-seconds have passed):
  on-demand  --adapters random LoRA adapters (ranks cycling through --ranks) in the model store, none loaded at
             start; BENTOSERVICE_MAX_LORAS slots, BENTOSERVICE_MAX_CPU_LORAS in host memory, the rest on disk
  resident   the first --slots of those adapters loaded at start, all in slots
Each request names an adapter drawn from a Zipf distribution (exponent --zipf) over the adapters it may use (the
same seed for both). Reported: output tokens/s of each and their ratio; from the server's /metrics, the requests
per tier on arrival and the load times under the load, p50/p99 by histogram_quantile over its buckets (`disk`: read
into host memory on the loader thread; `cpu`: host memory into a slot, on the engine thread); and, on a model in this
process that does nothing else, the cold-load latency p50/p99 of the two ways into a slot, measured exactly: host ->
slot (install the read adapter) and disk -> slot (look it up in the store, read the PEFT folder, then install).
The model store is a separate one under --work-dir (BENTOML_HOME), so that the benchmark's adapters do not join the
user's.

    python bench/adapters.py --streams 16 --max-tokens 64 --adapters 100 --slots 8 --cpu-loras 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import (  # noqa: E402
    PROMPTS,
    add_load_args,
    add_output_args,
    make_adapters,
    prepare,
    run_load,
    start_server,
    summarize,
    warmup_prompts,
)


def make_stored_adapters(args: argparse.Namespace, model_dir: Path) -> dict[str, Path]:
    """--adapters random adapters in the store, name -> their folder, ranks cycling through --ranks."""
    from bentoservice import store

    ranks = [args.ranks[i % len(args.ranks)] for i in range(args.adapters)]
    folders: dict[str, Path] = {}
    for rank in sorted(set(ranks)):
        count = ranks.count(rank)
        paths = make_adapters(model_dir, args.work_dir / f"adapters-{args.model}-r{rank}", count, rank)
        folders.update({f"r{rank}-{i + 1}": path for i, path in enumerate(paths)})
    # interleave the ranks, so that the most requested adapters are of every rank
    names = [f"r{rank}-{ranks[:i].count(rank) + 1}" for i, rank in enumerate(ranks)]
    stored = {m.name for m in store.adapters_of(args.model)}
    for name in names:
        if name not in stored:
            store.save_adapter(name, folders[name], args.model)
    return {name: folders[name] for name in names}


def zipf_names(names: list[str], count: int, exponent: float, seed: int) -> list[str]:
    """`count` draws from `names`, the k-th (from 1) with probability proportional to 1 / k**exponent."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    draws = np.random.default_rng(seed).choice(len(names), size=count, p=weights / weights.sum())
    return [names[i] for i in draws]


def scrape(url: str) -> dict[str, dict[str, float]]:
    """The adapter metrics on /metrics: requests per tier on arrival, loads and their total seconds per tier."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found: dict[str, dict[str, float]] = {}
    for metric in ("requests_total", "loads_total", "load_seconds_sum", "evictions_total"):
        pattern = rf'^bentoservice_adapter_{metric}\{{[^}}]*tier="(\w+)"[^}}]*\}} ([0-9.e+-]+)$'
        found[metric] = {tier: float(value) for tier, value in re.findall(pattern, text, re.M)}
    for labels, value in re.findall(r"^bentoservice_adapter_load_seconds_bucket\{([^}]*)\} ([0-9.e+-]+)$", text, re.M):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found.setdefault(f"le_{label['le']}", {})[label["tier"]] = float(value)
    return found


def histogram_quantile(counts: dict[str, dict[str, float]], tier: str, q: float) -> float:
    """Prometheus' histogram_quantile over the load-time buckets of one tier (linear within a bucket), seconds."""
    buckets = sorted((float(key[3:]), values.get(tier, 0.0)) for key, values in counts.items() if key.startswith("le_"))
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return float("nan")
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= q * total:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (q * total - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def tier_latencies(model_dir: Path, names: list[str], slots: int, rank: int) -> dict[str, list[float]]:
    """Seconds of each stored adapter's way into a slot on a CPU model doing nothing else, as the engine takes it:
    host -> slot (the install and the refresh of the lean pass's stacks) and disk -> slot (the store lookup and the
    read first). After the first `slots` loads every one evicts the least recently used."""
    import torch
    from transformers import AutoModelForCausalLM

    from bentoservice import store
    from bentoservice.engine.adapters import AdapterManager
    from bentoservice.engine.forward import Forward

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    manager = AdapterManager(model, slots, rank, max_cpu_loras=len(names))
    forward = Forward(model, manager.batch, 16, cuda_graphs=False)
    times: dict[str, list[float]] = {"host": [], "disk": []}
    for round_ in range(2):  # the first round grows the stacks to their final shape; the second is timed
        for name in names:
            started = time.perf_counter()
            prepared = manager.prepare(name, store.adapter_source(name).folder, name)
            read = time.perf_counter()
            if name in manager.loaded:
                manager.unload(name)
            forward.slot_rewritten(manager.install(prepared).slot)
            done = time.perf_counter()
            if round_:
                times["host"].append(done - read)
                times["disk"].append(done - started)
    return times


def run_target(
    label: str, args: argparse.Namespace, model_dir: Path, adapters: list[Path], env: dict[str, str], models: list[str]
) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    server = start_server("bentoservice", args, model_dir, adapters, args.work_dir, env, log_name=label)
    try:
        server.wait_ready(args.ready_timeout)
        if args.warmup_tokens:
            asyncio.run(
                run_load(server, warmup_prompts(args.streams), models, args.streams, 1, args.warmup_tokens, True)
            )
        before = scrape(server.url)
        results, wall = asyncio.run(
            run_load(server, prompts, models, args.streams, args.rounds, args.max_tokens, True, args.min_seconds)
        )
        after = scrape(server.url)
    finally:
        server.stop()
    delta = {
        metric: {tier: value - before.get(metric, {}).get(tier, 0.0) for tier, value in values.items()}
        for metric, values in after.items()
    }
    served = {
        tier: {
            "p50_ms": histogram_quantile(delta, tier, 0.5) * 1e3,
            "p99_ms": histogram_quantile(delta, tier, 0.99) * 1e3,
        }
        for tier in delta["loads_total"]
    }
    metrics = {key: values for key, values in delta.items() if not key.startswith("le_")}
    return {**summarize(results, wall, args.max_tokens, tokenizer), "adapters": metrics, "load_ms": served}


def main() -> None:
    parser = argparse.ArgumentParser(description="Adapters on demand (see the module docstring)")
    parser.add_argument("--model", default="smollm2", help="store name of the base model")
    add_load_args(parser)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[8, 12, 16])
    parser.add_argument("--slots", type=int, default=8, help="BENTOSERVICE_MAX_LORAS")
    parser.add_argument("--cpu-loras", type=int, default=32, help="BENTOSERVICE_MAX_CPU_LORAS")
    parser.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent s of the adapters' popularity")
    parser.add_argument("--seed", type=int, default=0)
    add_output_args(parser)
    parser.set_defaults(min_seconds=60)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(args.work_dir / "bentoml")  # before bentoml is imported, servers inherit it
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.random_model = args.model_dir = args.tokenizer = None  # prepare(): the base from its package, into the store

    model_dir, _ = prepare(args, with_adapters=False)
    folders = make_stored_adapters(args, model_dir)
    names = list(folders)
    draws = 64 * args.streams * max(args.rounds, 8)
    rows = {
        "on-demand": run_target(
            "adapters-on-demand",
            args,
            model_dir,
            [],
            {"BENTOSERVICE_MAX_LORAS": str(args.slots), "BENTOSERVICE_MAX_CPU_LORAS": str(args.cpu_loras)},
            zipf_names(names, draws, args.zipf, args.seed),
        ),
        "resident": run_target(
            "adapters-resident",
            args,
            model_dir,
            [folders[name] for name in names[: args.slots]],
            {"BENTOSERVICE_MAX_LORAS": str(args.slots)},
            zipf_names([f"a{i + 1}" for i in range(args.slots)], draws, args.zipf, args.seed),
        ),
    }
    latencies = tier_latencies(model_dir, names, args.slots, max(args.ranks))
    pct = {
        path: {"p50_ms": float(np.percentile(xs, 50)) * 1e3, "p99_ms": float(np.percentile(xs, 99)) * 1e3}
        for path, xs in latencies.items()
    }
    ratio = rows["on-demand"]["tok_s"] / rows["resident"]["tok_s"]
    for label, row in rows.items():
        print(f"{label}: {json.dumps(row)}", flush=True)
    print(f"\non-demand / resident output tokens/s: {ratio:.2f}x")
    for path, q in pct.items():
        print(f"cold load {path} -> slot: p50 {q['p50_ms']:.1f} ms, p99 {q['p99_ms']:.1f} ms")
    if args.json:
        setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        setup["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        args.json.write_text(json.dumps({"setup": setup, "results": rows, "ratio": ratio, "cold_load": pct}, indent=2))


if __name__ == "__main__":
    main()
