"""Structured outputs' costs: compiling a JSON schema (first use, then from the cache), and serving throughput with
every row under a JSON schema against none, on one server, the same load, phases alternated.

    python bench/structured.py --model smollm2 --streams 16 --max-tokens 64 --phases 2

Compile times are measured in this process on the served model's tokenizer (engine/grammar.py's `Grammars`, as the
server uses it). The serving phases use bench/serving.py's clients (streaming chat, prompts from
bench/prompts.jsonl, temperature 0) against one `bentoservice start MODEL` on the bare base; a phase lasts
--min-seconds, and phases alternate free / schema so that drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from serving import PROMPTS, prepare, run_load, start_server, summarize, warmup_prompts

REPLY = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"enum": ["low", "medium", "high"]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
"""The served schema: a free string first, so a constrained reply is about as long as a free one."""


def order_schema(fields: int) -> dict:
    """A larger schema, as an API's: nested objects, arrays, enums, formats and bounds."""
    item = {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "price": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        },
        "required": ["sku", "quantity", "price"],
        "additionalProperties": False,
    }
    properties: dict = {
        "id": {"type": "string", "format": "uuid"},
        "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
        "items": {"type": "array", "items": item, "minItems": 1},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
            "required": ["name", "email"],
            "additionalProperties": False,
        },
    }
    properties |= {f"note_{i}": {"type": ["string", "null"], "maxLength": 200} for i in range(fields - len(properties))}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def compile_times(tokenizer, vocab_size: int, end_ids: set[int], repeats: int) -> dict:
    from bentoservice.engine.grammar import Grammars
    from bentoservice.engine.params import Grammar

    started = time.perf_counter()
    grammars = Grammars(tokenizer, vocab_size, end_ids, max_rows=16)
    rows = {"tokenizer_info_s": time.perf_counter() - started}
    for name, schema in (("reply", REPLY), ("order (24 fields)", order_schema(24)), ("json_object", None)):
        firsts, cached = [], []
        for i in range(repeats):
            grammars.compile.cache_clear()
            grammar = Grammar("json") if schema is None else Grammar.of_schema({**schema, "title": f"t{i}"})
            started = time.perf_counter()
            grammars.compile(grammar)
            firsts.append(time.perf_counter() - started)
            started = time.perf_counter()
            grammars.compile(grammar)
            cached.append(time.perf_counter() - started)
        rows[name] = {"first_ms": statistics.median(firsts) * 1e3, "cached_us": statistics.median(cached) * 1e6}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Structured outputs' costs (see the module docstring)")
    parser.add_argument("--model", default="smollm2", help="store name of the base model")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-seconds", type=float, default=30, help="length of one phase")
    parser.add_argument("--phases", type=int, default=2, help="free / schema pairs")
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bentoservice-bench")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.random_model = args.model_dir = None
    model_dir, _ = prepare(args, with_adapters=False)

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    compiled = compile_times(tokenizer, vocab, {tokenizer.eos_token_id}, args.compile_repeats)
    print(f"compile: {json.dumps(compiled)}", flush=True)

    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": REPLY}}}
    server = start_server("bentoservice", args, model_dir, [], args.work_dir)
    phases: list[dict] = []
    try:
        server.wait_ready()
        models = [f"{args.model}:base"]
        asyncio.run(run_load(server, warmup_prompts(args.streams), models, args.streams, 1, 8, True, 0, schema))
        for _ in range(args.phases):
            for name, extra in (("free", None), ("json_schema", schema)):
                results, wall = asyncio.run(
                    run_load(server, prompts, models, args.streams, 1, args.max_tokens, True, args.min_seconds, extra)
                )
                phases.append({"phase": name, **summarize(results, wall, args.max_tokens, tokenizer)})
                print(json.dumps(phases[-1]), flush=True)
                if extra is not None:
                    bad = [r.text for r in results if r.finish == "stop" and not _parses(r.text)]
                    assert not bad, f"constrained replies that do not parse: {bad[:3]}"
    finally:
        server.stop()
    totals = {
        name: sum(p["output_tokens"] for p in phases if p["phase"] == name)
        / sum(p["wall_s"] for p in phases if p["phase"] == name)
        for name in ("free", "json_schema")
    }
    print(
        f"\nfree {totals['free']:.1f} tok/s, json_schema {totals['json_schema']:.1f} tok/s: "
        f"{100 * (totals['json_schema'] / totals['free'] - 1):+.1f}%"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"work_dir": str(args.work_dir)},
                    "compile": compiled,
                    "phases": phases,
                    "tok_s": totals,
                },
                indent=2,
                default=str,
            )
        )


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


if __name__ == "__main__":
    main()
