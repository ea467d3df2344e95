"""Reinforcement fine-tuning on the CPU: SmolLM2 learns a small verifiable task, its held-out reward before and after.

The task is made here: "Is WORD a fruit? Answer yes or no.", graded by a string_check grader (ilike) against the
line's own answer (`{{item.answer}}`), the way an OpenAI reinforcement job's lines carry their reference. Training
and held-out words do not overlap. The run is the code path a reinforcement job runs (training.methods.rl with
TRL's GRPOTrainer, rollouts from TRL's generation); the held-out reward is TRL's evaluation of the validation
prompts, sampled `--samples` times each, on the base (step 0, before any update) and on the trained adapter.

    python bench/rft.py --steps 4          # SmolLM2 from the store (make serve's import step puts it there)

Prints one JSON line: the reward before and after, and the wall time of loading, training and evaluating.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FRUITS = ["apple", "banana", "cherry", "mango", "pear", "plum", "grape", "lemon", "peach", "melon", "kiwi", "lime"]
OTHERS = ["river", "candle", "silver", "tiger", "window", "hammer", "cloud", "stone", "horse", "paper", "chair", "shoe"]
GRADER = {
    "type": "string_check",
    "name": "answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "ilike",
}


def lines(fruits: list[str], others: list[str]) -> list[dict[str, Any]]:
    words = [pair for both in zip(fruits, others, strict=True) for pair in ((both[0], "yes"), (both[1], "no"))]
    return [
        {"messages": [{"role": "user", "content": f"Is {w} a fruit? Answer yes or no."}], "answer": answer}
        for w, answer in words
    ]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="prompts a step (OpenAI's batch_size)")
    parser.add_argument("--generations", type=int, default=4, help="completions a prompt")
    parser.add_argument("--samples", type=int, default=4, help="completions a held-out prompt")
    parser.add_argument("--tokens", type=int, default=4, help="max completion tokens")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bentoservice.training.config import TrainingConfig
    from bentoservice.training.methods.rl import run_reinforcement

    folder = Path(tempfile.mkdtemp(prefix="bench-rft-"))
    train = write(folder / "train.jsonl", lines(FRUITS[:8], OTHERS[:8]))
    valid = write(folder / "valid.jsonl", lines(FRUITS[8:], OTHERS[8:]))
    config = TrainingConfig(
        model=options.model,
        method="grpo",
        grader=GRADER,
        train_file=train,
        test_file=valid,
        adapter_name="bench-rft",
        args=dict(
            output_dir=str(folder / "out"),
            max_steps=options.steps,
            learning_rate=options.learning_rate,
            per_device_train_batch_size=options.prompts * options.generations,
            num_generations=options.generations,
            num_generations_eval=options.samples,
            per_device_eval_batch_size=len(FRUITS[8:] + OTHERS[8:]) * options.samples,
            max_completion_length=options.tokens,
            logging_steps=1,
            save_strategy="no",
            seed=options.seed,
        ),
    )
    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    result = run_reinforcement(config, sink=events.append)
    wall = time.perf_counter() - started
    before = next(e["eval_reward"] for e in events if e.get("step") == 0 and "eval_reward" in e)
    train_rewards = [round(e["reward"], 3) for e in events if "reward" in e]
    print(
        json.dumps(
            {
                "model": options.model,
                "steps": options.steps,
                "completions_a_step": options.prompts * options.generations,
                "max_completion_tokens": options.tokens,
                "held_out_samples": len(FRUITS[8:] + OTHERS[8:]) * options.samples,
                "held_out_reward_before": round(before, 3),
                "held_out_reward_after": round(result.metrics["eval_reward"], 3),
                "train_reward_by_step": train_rewards,
                "wall_seconds": round(wall, 1),
                "train_seconds": round(result.metrics.get("train_runtime", float("nan")), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
