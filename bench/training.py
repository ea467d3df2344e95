"""Training throughput: this project's SFT trainer against a plain Hugging Face Trainer + peft baseline.

Both train the same LoRA adapter (the product's defaults: r=16, alpha 32, all linear layers) on the same
chats, in the same order, for the same steps, from the same weights. The baseline is what a user writes by
hand: `Trainer` + `get_peft_model`, batches padded to their longest example, default settings. Ours is
`trainers.build_trainer`, the code path a fine-tune job runs. Each variant runs in its own process, so that
peak memory is its own.

Reported per variant: trained (non-padding) tokens per second and the median step time over the measured
steps (after warm-up steps), peak memory (CUDA: allocated by PyTorch; CPU: the process's peak RSS), the loss
(mean of the last 3 steps; the per-step losses must follow the baseline's), and on CUDA the model FLOP
utilisation: 4 x parameters x tokens (forward, and backward to the activations: LoRA trains no base weight),
and with causal attention added (6 x l^2 x attention width x layers per example of l tokens), over the
H100's 989 TFLOP/s dense bf16.

    python bench/training.py --model smollm2                       # the default model, on this machine
    python bench/training.py --shape llama-1b --tokenizer DIR      # random weights, Llama-3.2-1B's shape
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H100_BF16_FLOPS = 989e12
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


@dataclass
class Spec:
    variant: str
    model: str | None
    shape: str | None
    tokenizer: str | None
    examples: int
    mean_tokens: int
    min_tokens: int
    max_tokens: int
    batch: int
    steps: int
    warmup: int
    seed: int
    baseline_checkpointing: bool = False
    lora_dropout: float | None = None
    accumulate: int = 1
    profile: str | None = None


@dataclass
class Result:
    variant: str
    device: str
    tokens_per_second: float
    step_seconds: float
    peak_gib: float
    reserved_gib: float
    loss: float
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    padded_tokens: int = 0
    params: int = 0
    mfu: float | None = None
    mfu_attention: float | None = None
    checkpointed_layers: int = 0
    """The most decoder layers checkpointed in a measured step."""
    mean_length: float = 0.0
    first_step_seconds: float = 0.0
    """The first step's time: compilation, when the variant compiles."""
    passes: int = 1
    """The most forward passes in one measured step."""
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    """Each measured step's seconds and trained tokens."""


# --- data ------------------------------------------------------------------------------------


def chat_rows(tokenizer: Any, spec: Spec) -> list[dict[str, Any]]:
    """Chats whose lengths follow a skewed (log-normal) distribution of mean about `mean_tokens`.

    The assistant repeats the user's words, sometimes over two turns: a task with something to learn, so
    that the losses say whether both trainers learn the same.
    """
    from bentoservice.training.methods.trainers import render

    words = sorted(
        {
            w.strip()
            for w in tokenizer.convert_ids_to_tokens(range(min(len(tokenizer), 30000)))
            if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower() and len(w) > 3
        }
    )
    words = [w[1:] for w in words]
    rng = random.Random(spec.seed)
    sigma = 0.8
    mu = math.log(spec.mean_tokens) - sigma**2 / 2
    rows = []
    while len(rows) < spec.examples:
        target = min(max(int(rng.lognormvariate(mu, sigma)), spec.min_tokens), spec.max_tokens)
        turns = 2 if rng.random() < 0.3 else 1
        messages: list[dict[str, str]] = []
        for _ in range(turns):
            text = " ".join(rng.choice(words) for _ in range(max(1, target // (2 * turns) - 10)))
            messages += [
                {"role": "user", "content": f"Repeat after me: {text}"},
                {"role": "assistant", "content": text},
            ]
        while len(render(tokenizer, messages)) > spec.max_tokens:
            for m in messages:
                m["content"] = " ".join(m["content"].split()[: -max(1, len(m["content"].split()) // 10)])
        rows.append({"messages": messages})
    return rows


# --- one variant, in its own process ----------------------------------------------------------


class StepMeter:
    """Wall time at each step's end (after the device finishes), and the real tokens of each batch."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.passes: list[int] = []
        self.pass_tokens: int | None = None
        """The trainer's most tokens a pass, when it splits batches."""

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter.sync()
                meter.ends.append(time.perf_counter())

            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                meter.sync()
                meter.ends.append(time.perf_counter())

        return Callback()

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def watch(self, trainer: Any) -> None:
        """Count each batch the trainer fetches (in this process: the batches may be collated in loader workers)."""
        from bentoservice.training.speed.passes import split_passes

        fetch = trainer.get_batch_samples

        def get_batch_samples(*args: Any, **kwargs: Any) -> Any:
            batches, count = fetch(*args, **kwargs)
            for batch in batches:
                mask = batch.get("attention_mask")
                self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
                self.padded.append(batch["input_ids"].numel())
                split = self.pass_tokens and "cu_seq_lens_q" in batch
                self.passes.append(len(split_passes(batch, self.pass_tokens)) if split else 1)
            return batches, count

        trainer.get_batch_samples = get_batch_samples


def build_model(spec: Spec, device: str, tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bentoservice.training import hardware

    if spec.shape is None:
        model = hardware.load_model(Path(model_dir(spec.model)), device, "lora")  # type: ignore[arg-type]
        return model.to(device)
    config = LlamaConfig(
        **SHAPES[spec.shape],
        **LLAMA3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def model_dir(name: str) -> str:
    if Path(name).is_dir():
        return name
    from bentoservice import store

    return str(store.ensure_base(name).path)


def make_trainer(spec: Spec) -> tuple[Any, StepMeter, list[int]]:
    """The variant's trainer, its step meter and the examples' lengths."""
    import torch
    from transformers import AutoTokenizer

    from bentoservice.training import hardware
    from bentoservice.training.config import TrainingConfig
    from bentoservice.training.data import formats
    from bentoservice.training.jobs.callbacks import ProgressCallback
    from bentoservice.training.methods import trainers

    device = hardware.detect_device()
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or model_dir(spec.model))  # type: ignore[arg-type]
    rows = chat_rows(tokenizer, spec)
    dataset = trainers.hf_dataset(tokenizer, formats.Dataset("openai_chat", "sft", rows))
    model = build_model(spec, device, tokenizer)
    args = {
        "per_device_train_batch_size": spec.batch,
        "gradient_accumulation_steps": spec.accumulate,
        "max_steps": spec.warmup + spec.steps + bool(spec.profile),
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": spec.seed,
        "data_seed": spec.seed,
    }
    lora = {} if spec.lora_dropout is None else {"lora_dropout": spec.lora_dropout}
    config = TrainingConfig(model="bench", args=args, **lora)
    output_dir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    trainer_args = trainers.training_args(config, device, output_dir)
    meter = StepMeter(device)
    torch.manual_seed(spec.seed)  # the same LoRA initialisation in every variant
    if spec.variant == "baseline":
        trainer = baseline_trainer(config, model, tokenizer, trainer_args, dataset, spec.baseline_checkpointing)
    else:
        trainer = trainers.build_trainer(
            config,
            model,
            tokenizer,
            trainer_args,
            dataset,
            None,
            ProgressCallback(),
            device,
            variant_speedups(spec.variant, device),
        )
    meter.watch(trainer)
    meter.pass_tokens = getattr(trainer, "pass_tokens", None)
    trainer.add_callback(meter.callback())
    if spec.profile:
        trainer.add_callback(profile_callback(spec, device))
    return trainer, meter, [len(ids) for ids in dataset["input_ids"]]


def profile_callback(spec: Spec, device: str) -> Any:
    """Profiles the step after the measured ones, as the step meter times a step (from the end of the one before:
    its log and the next batch included): the kernels and operators that took the most time, and how busy the
    device was, written to `spec.profile`/VARIANT.txt, and its timeline to VARIANT.json.gz (chrome://tracing)."""
    import torch
    from transformers import TrainerCallback

    profiled = spec.warmup + spec.steps

    class Callback(TrainerCallback):
        profiler: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == profiled:  # after the step meter's callback, which waits for the device
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.start = time.perf_counter()
                return
            if self.profiler is None:
                return
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            kernels = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
            sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            path = Path(spec.profile) / (re.sub(r"[^\w.-]", "_", spec.variant) + ".txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                f"step {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%}), {len(kernels)} kernels\n"
                + events.table(sort_by=sort, row_limit=40, max_name_column_width=80)
            )
            self.profiler.export_chrome_trace(str(path.with_suffix(".json.gz")))
            self.profiler = None

    return Callback()


def run_variant(spec: Spec) -> Result:
    import torch

    trainer, meter, lengths = make_trainer(spec)
    device = meter.device
    model = trainer.model
    params = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # the base model's: LoRA trains the rest
    text = model.config.get_text_config()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log][: spec.warmup + spec.steps]
    ends = meter.ends[: spec.warmup + spec.steps + 1]
    step_times = [b - a for a, b in zip(ends[spec.warmup :], ends[spec.warmup + 1 :], strict=False)]
    per_step = trainer.args.gradient_accumulation_steps  # collated batches a step
    window = slice(spec.warmup * per_step, (spec.warmup + spec.steps) * per_step)
    seconds = ends[-1] - ends[spec.warmup]
    tokens = sum(meter.tokens[window])
    if device == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = Result(
        spec.variant,
        device,
        tokens / seconds,
        statistics.median(step_times),
        peak / 2**30,
        reserved / 2**30,
        statistics.fmean(losses[-3:]),
        losses,
        tokens,
        sum(meter.padded[window]),
        params,
        checkpointed_layers=most_checkpointed(trainer, meter.padded[window]),
        mean_length=statistics.fmean(lengths),
        first_step_seconds=ends[1] - ends[0],
        passes=max(meter.passes[window], default=1),
        step_times=step_times,
        step_tokens=[sum(meter.tokens[i : i + per_step]) for i in range(window.start, window.stop, per_step)],
    )
    if device == "cuda":
        flops = 4 * params * tokens
        # The measured steps' examples are not known one by one here: scale the data's mean l^2 to their tokens.
        per_token_l2 = sum(n * n for n in lengths) / sum(lengths)
        attention = 6 * per_token_l2 * tokens * text.num_attention_heads * text.head_dim * text.num_hidden_layers
        result.mfu = flops / seconds / H100_BF16_FLOPS
        result.mfu_attention = (flops + attention) / seconds / H100_BF16_FLOPS
    return result


def most_checkpointed(trainer: Any, batches: list[int]) -> int:
    """The most decoder layers checkpointed in one of the steps, which held `batches` tokens (padding included)."""
    from bentoservice.training.speed import plan as speed

    plan = getattr(trainer, "memory", None)
    if plan is not None:
        return max(plan.checkpointed(tokens) for tokens in batches)
    return sum(layer.gradient_checkpointing is True for layer in speed.decoder_layers(trainer.model))


def baseline_trainer(
    config: Any, model: Any, tokenizer: Any, args: dict[str, Any], dataset: Any, checkpointing: bool
) -> Any:
    """A plain Trainer + peft, as a user writes it: padded to the longest in each batch, default settings
    (`checkpointing`: every layer, as a user does when the default runs out of memory)."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bentoservice.training.data.labels import IGNORE
    from bentoservice.training.methods.trainers import lora_config

    plain = {k: v for k, v in args.items() if k in TrainingArguments.__dataclass_fields__}
    plain.update(include_num_input_tokens_seen="no", gradient_checkpointing=checkpointing)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    return Trainer(
        model=get_peft_model(model, lora_config(config)),
        args=TrainingArguments(**plain),
        train_dataset=dataset,
        data_collator=collator,
    )


def variant_speedups(variant: str, device: str) -> Any:
    """`ours` is the trainer's own choice; `ours+compile`, `ours-liger`, `ours-padfree` add or remove one of the
    speedups a short run gets."""
    from dataclasses import replace

    from bentoservice.training.speed import plan as speed

    if variant == "ours":
        return None
    speedups = speed.defaults(device, planned_tokens=0)  # type: ignore[arg-type]
    for change in variant.replace("-", " -").replace("+", " +").split()[1:]:
        on = change[0] == "+"
        if change[1:] == "padfree":
            speedups = replace(speedups, padding_free=on, labelled_logits=on and speedups.labelled_logits)
        else:
            speedups = replace(speedups, **{change[1:]: on})
    return speedups


# --- the comparison -------------------------------------------------------------------------


def compare(results: list[Result]) -> str:
    base = next((r for r in results if r.variant == "baseline"), None)
    lines = [
        "| variant | tokens/s | x baseline | step s | peak GiB | x baseline | loss | max step loss diff "
        "| MFU 4N | MFU 4N+attn | padding | most checkpointed layers | most passes a step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        speedup = f"{r.tokens_per_second / base.tokens_per_second:.2f}" if base else "-"
        memory = f"{r.peak_gib / base.peak_gib:.2f}" if base else "-"
        diff = max((abs(a - b) for a, b in zip(r.losses, base.losses, strict=False)), default=0.0) if base else 0.0
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        mfu_attn = f"{r.mfu_attention:.1%}" if r.mfu_attention is not None else "-"
        padding = f"{1 - r.tokens / r.padded_tokens:.0%}" if r.padded_tokens else "-"
        lines.append(
            f"| {r.variant} | {r.tokens_per_second:,.0f} | {speedup} | {r.step_seconds:.3f} | "
            f"{r.peak_gib:.2f} | {memory} | {r.loss:.4f} | {diff:.4f} | {mfu} | {mfu_attn} | {padding} | "
            f"{r.checkpointed_layers} | {r.passes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a base model in the store, or a Hugging Face model folder")
    source.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight Llama of this shape")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    parser.add_argument("--variants", default="baseline,ours")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--mean-tokens", type=int, default=549)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, help="LoRA dropout for all variants (default: the product's)")
    parser.add_argument(
        "--baseline-checkpointing",
        action="store_true",
        help="checkpoint every layer of the baseline (when it does not fit otherwise)",
    )
    parser.add_argument(
        "--accumulate", type=int, default=1, help="gradient accumulation steps: a step trains --batch x this many chats"
    )
    parser.add_argument("--profile", help="profile one step after the measured ones into this folder")
    parser.add_argument("--json", type=Path, help="append each result to this JSON Lines file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("LOG %(name)s: %(message)s"))
        logging.getLogger("bentoservice").addHandler(handler)
        logging.getLogger("bentoservice").setLevel(logging.INFO)
        print("RESULT " + json.dumps(asdict(run_variant(Spec(**json.loads(ns.child))))), flush=True)
        return
    if ns.model is None and ns.shape is None:
        ns.model = "smollm2"
    results = []
    for variant in ns.variants.split(","):
        spec = Spec(
            variant,
            ns.model,
            ns.shape,
            ns.tokenizer,
            ns.examples,
            ns.mean_tokens,
            ns.min_tokens,
            ns.max_tokens,
            ns.batch,
            ns.steps,
            ns.warmup,
            ns.seed,
            ns.baseline_checkpointing,
            ns.lora_dropout,
            ns.accumulate,
            ns.profile,
        )
        result = run_child(spec)
        if result is None:
            continue
        results.append(result)
        print(
            f"{variant}: {result.tokens_per_second:,.0f} tokens/s, {result.peak_gib:.2f} GiB, "
            f"loss {result.loss:.4f}, mean example {result.mean_length:.0f} tokens",
            flush=True,
        )
        if ns.json:
            with ns.json.open("a") as f:
                f.write(json.dumps({**asdict(result), "spec": asdict(spec)}) + "\n")
    print(compare(results))


def run_child(spec: Spec) -> Result | None:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("LOG "):
            print(f"  {spec.variant}: {line[4:]}", flush=True)
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT ") :]))
    print(f"{spec.variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
    return None


if __name__ == "__main__":
    main()
