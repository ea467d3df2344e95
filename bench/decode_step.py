"""One decode step of the engine, timed at several batch sizes, against the memory-bandwidth limit.

A decode step must read every weight once, each row's KV cache and, with mixed adapters, the LoRA
stacks; at small batches that traffic, over the device's measured copy bandwidth, bounds the step.
For each batch size this prints the step time (CUDA-graph replay on a GPU, eager on the CPU), output
tokens/s, the bytes the step must move, and the share of the bandwidth limit reached.

    python bench/decode_step.py --random-model llama-3.2-1b --tokenizer TOKENIZER_DIR --batches 1,128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import SHAPES, make_random_model  # noqa: E402

from bentoservice.engine.adapters import AdapterManager, PreparedAdapter  # noqa: E402
from bentoservice.engine.forward import Forward  # noqa: E402


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    a = torch.empty(256 * 2**20, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * 10 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_adapters(model: torch.nn.Module, manager: AdapterManager, count: int, rank: int) -> None:
    """`count` rank-`rank` adapters on every linear layer of the decoder, random non-zero A and B."""
    paths = [name for name, module in model.get_decoder().named_modules() if isinstance(module, torch.nn.Linear)]
    prefix = next(name for name, module in model.named_modules() if module is model.get_decoder())
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        weights = {}
        for path in paths:
            linear = model.get_decoder().get_submodule(path)
            weights[f"{prefix}.{path}"] = (
                torch.randn(rank, linear.in_features, generator=generator) * 0.01,
                torch.randn(linear.out_features, rank, generator=generator) * 0.01,
            )
        manager.install(PreparedAdapter(f"a{i + 1}", "random", rank, 2.0 * rank, 2.0, weights))


def step_bytes(model: torch.nn.Module, forward: Forward, rows: int, context: int, lora: bool) -> int:
    """What one decode step must read at least: weights (the input embedding only for the rows' tokens),
    each row's keys and values, and the LoRA stacks when adapters are mixed."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p is not embedding)
    head = model.get_output_embeddings().weight
    weights += (head.numel() if head is embedding else rows * embedding.shape[1]) * embedding.element_size()
    packed = [m.packed for m in model.modules() if hasattr(m, "packed")]
    packed += forward.lean.packed_weights() if forward.lean is not None else []
    weights += sum(w.numel() * w.element_size() for w in packed)
    kv_heads, head_dim = forward.cache.shape
    kv = rows * context * forward.cache.n_layers * 2 * kv_heads * head_dim * embedding.element_size()
    stacks = (
        sum(
            t.numel() * t.element_size()
            for m in model.modules()
            for t in (getattr(m, "lora_A", None), getattr(m, "lora_B", None))
            if isinstance(t, torch.Tensor)
        )
        if lora
        else 0
    )
    return weights + kv + stacks


def check_against_eager(forward: Forward, tokens: list[int], positions: list[int], slots: list[int]) -> str:
    """The replayed graph's logits against an eager pass on the same inputs (both write the same cache)."""
    graph_logits = forward.decode(tokens, positions, slots).logits.clone()
    forward.lora.set(slots, forward.dtype, forward.device)
    device = forward.device
    eager = forward._decode_pass(
        torch.tensor(tokens, device=device)[:, None], torch.tensor(positions, device=device), max(positions) + 1
    )
    error = float((graph_logits - eager).norm() / eager.norm())
    same = float((graph_logits.argmax(-1) == eager.argmax(-1)).float().mean())
    return f"rel. error {error:.1e}, same argmax {100 * same:.0f}%"


def check_prefill(model: torch.nn.Module, forward: Forward) -> str:
    """Packed prefill (varlen attention on a GPU) against the HF model run on each prompt alone (`model`: a
    copy of the engine's, whose HF layers lose their weights to the lean pass on a CPU); then the same
    prompts one token longer, which reuse the stored keys and values of the first pass."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, model.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 17, 40)]
    longer = [p + p[:1] for p in prompts]
    lines = []
    for name, batch in (("packed", prompts), ("with a reused prefix", longer)):
        packed = forward.prefill(batch, [0] * len(batch), 0)
        alone = torch.stack(
            [model(input_ids=torch.tensor([p], device=forward.device)).logits[0, -1].float() for p in batch]
        )
        error = float((packed - alone).norm() / alone.norm())
        same = float((packed.argmax(-1) == alone.argmax(-1)).float().mean())
        lines.append(
            f"prefill {name} (varlen: {forward.varlen}) vs alone: rel. error {error:.1e}, same argmax {100 * same:.0f}%"
        )
    forward.prefixes.clear()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode-step benchmark (see the module docstring)")
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model folder")
    parser.add_argument("--random-model", choices=sorted(SHAPES), help="make --model-dir as a random model")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for --random-model")
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--context", type=int, default=128, help="tokens already in each row's cache")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.random_model:
        folder = args.model_dir or Path(tempfile.gettempdir()) / "bentoservice-bench" / args.random_model
        args.model_dir = make_random_model(folder, args.tokenizer, args.random_model)
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    batches = [int(b) for b in args.batches.split(",")]
    manager = AdapterManager(model, args.adapters, args.lora_rank)
    forward = Forward(model, manager.batch, max(batches), cuda_graphs=device.type == "cuda", prefix_bytes=2**26)
    reference = (
        model
        if forward.lean is None
        else AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa").eval()
    )
    print(check_prefill(reference, forward), flush=True)
    del reference
    random_adapters(model, manager, args.adapters, args.lora_rank)
    forward.adapters_changed()
    bandwidth = copy_bandwidth(device)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s",
        flush=True,
    )

    vocab = model.config.vocab_size
    results = []
    for rows in batches:
        generator = torch.Generator().manual_seed(rows)
        prompts = [torch.randint(100, vocab, (args.context,), generator=generator).tolist() for _ in range(rows)]
        for start in range(0, rows, 16):
            forward.prefill(prompts[start : start + 16], [0] * len(prompts[start : start + 16]), start)
        for mode, slots in (("base", [0] * rows), ("mixed", [1 + i % args.adapters for i in range(rows)])):
            tokens = [int(t) for t in torch.randint(100, vocab, (rows,), generator=generator)]
            positions = [args.context] * rows

            def step(
                tokens: list[int] = tokens, positions: list[int] = positions, slots: list[int] = slots
            ) -> list[int]:
                return forward.decode(tokens, positions, slots).greedy_tokens()

            for _ in range(3):
                step()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds = (time.perf_counter() - start) / args.steps
            moved = step_bytes(model, forward, rows, args.context + 1, mode == "mixed")
            limit = moved / bandwidth
            agreement = check_against_eager(forward, tokens, positions, slots) if forward.cuda_graphs else None
            row = {
                "batch": rows,
                "adapters": mode,
                "step_ms": seconds * 1e3,
                "tok_s": rows / seconds,
                "graph_vs_eager": agreement,
                "bytes_per_step_gb": moved / 1e9,
                "bandwidth_limit_ms": limit * 1e3,
                "limit_tok_s": rows / limit,
                "share_of_limit": limit / seconds,
            }
            results.append(row)
            print(
                f"batch {rows:4d} {mode:5s}: {row['step_ms']:7.2f} ms/step {row['tok_s']:9.0f} tok/s | "
                f"{row['bytes_per_step_gb']:.2f} GB/step, limit {row['bandwidth_limit_ms']:.2f} ms "
                f"({row['limit_tok_s']:.0f} tok/s): {100 * row['share_of_limit']:.0f}% of the limit"
                + (f" | graph vs eager: {agreement}" if agreement else ""),
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(device),
                    "copy_bandwidth_gb_s": bandwidth / 1e9,
                    "context": args.context,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
