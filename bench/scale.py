"""Training throughput by number of data-parallel workers: one fine-tuning job (LoRA on a stored model, a fixed global
batch) run through the real job queue by 1 local process, by N accelerate (DDP) processes, and, with --ray-address, by
N Ray Train workers on that cluster. Reports tokens per second in all and per worker, as ratios to the 1-process run
measured in the same invocation.

    python bench/scale.py --model smollm2 --workers 1,2 --steps 6 --global-batch 8 [--ray-address http://127.0.0.1:8265]

Throughput is the trainer's own (non-padding input tokens over train_runtime: model loading and process start are
left out); `wall_s` is from launch to the stored adapter, everything included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = "the a model learns to answer kindly and briefly about cities rivers numbers colours weather music".split()


def chats(count: int, seed: int) -> list[dict[str, Any]]:
    """Chats with replies of 20 to 120 words, so that batches differ in length as real data does."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me something, number {i}."},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))},
            ]
        }
        for i in range(count)
    ]


def run(args: argparse.Namespace, backend: str, workers: int, train: Path, folder: Path) -> dict[str, Any]:
    from bentoservice.training.jobs.queue import JobQueue
    from bentoservice.training.jobs.store import JobStore

    jobs = JobStore()
    config = {
        "model": args.model,
        "method": "sft",
        "train_file": str(train),
        "adapter_name": f"bench-scale-{backend}-{workers}",
        "scale": {"backend": backend, "num_workers": workers, "gpus_per_worker": 0},
        "args": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.global_batch // workers,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
            "output_dir": str(folder / f"out-{backend}-{workers}"),
        },
    }
    job = jobs.add_job(
        model=args.model, request={}, config=config, fine_tuned_model=config["adapter_name"], status="queued"
    )
    queue = JobQueue(jobs, on_success=lambda job: None, concurrency=1)
    start = time.monotonic()
    while (current := jobs.get_job(job["id"]))["status"] not in ("succeeded", "failed", "cancelled"):
        queue.tick()
        time.sleep(0.5)
    wall = time.monotonic() - start
    if current["status"] != "succeeded":
        raise SystemExit(f"{backend} x{workers} {current['status']}: {current['error']}")
    events, _ = jobs.list_events(job["id"], limit=1000)
    metrics = next(e["data"]["metrics"] for e in events if e["message"] == "Training completed")
    tokens_per_s = metrics["num_input_tokens_seen"] / metrics["train_runtime"]
    _delete(current["store_tag"])
    return {
        "backend": backend,
        "workers": workers,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "tokens": int(metrics["num_input_tokens_seen"]),
        "train_s": round(metrics["train_runtime"], 1),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_worker": round(tokens_per_s / workers, 1),
        "final_loss": metrics.get("train_loss"),
    }


def _delete(tag: str) -> None:
    import bentoml

    bentoml.models.delete(tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts; 1 is always run first")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--ray-address", help="also run each count > 1 on this Ray cluster (its Jobs API address)")
    parser.add_argument("--json", help="append the results to this JSON-lines file")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    os.environ.update(BENTOSERVICE_DATA_DIR=str(folder / "data"), BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    if args.ray_address:
        os.environ["BENTOSERVICE_RAY_ADDRESS"] = args.ray_address
    train = folder / "chats.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in chats(args.examples, seed=0)))

    counts = sorted({1, *(int(n) for n in args.workers.split(","))})
    runs = [("local", n) for n in counts] + [("ray", n) for n in counts if n > 1 and args.ray_address]
    results: list[dict[str, Any]] = []
    for backend, workers in runs:
        result = run(args, backend, workers, train, folder)
        result["vs_1_process"] = round(result["tokens_per_s"] / results[0]["tokens_per_s"], 2) if results else 1.0
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as out:
            out.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
