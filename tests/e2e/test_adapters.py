"""LoRA adapters over one base: per-request choice, a default switched at runtime, load/unload, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import Server, make_tiny_model
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bentoservice import store
from bentoservice.config import Settings

PROMPT = "The quick brown fox"


def make_adapter(
    folder: Path, base_dir: Path, seed: int, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, so that it changes the model's output."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, adapter_root: Path) -> dict[str, Path]:
    return {name: make_adapter(adapter_root / name, tiny_dir, seed) for name, seed in (("a1", 1), ("a2", 2), ("a3", 3))}


@pytest.fixture(scope="module")
def server(tiny, adapters: dict[str, Path], adapter_root: Path):
    server = Server(
        "tiny",
        "--adapter-id",
        str(adapters["a1"]),
        "--adapter-name",
        "a1",
        "--adapter-id",
        str(adapters["a2"]),
        "--adapter-name",
        "a2",
        env={"BENTOSERVICE_ADAPTER_DIRS": str(adapter_root), "BENTOSERVICE_MAX_LORA_RANK": "8"},
    )
    yield server
    server.stop()


def complete(server: Server, model: str, prompt: str = PROMPT) -> str:
    done = server.client().completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    return done.choices[0].text


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1{path}", json=body, timeout=60)


def test_adapters_change_output_and_first_is_default(server: Server) -> None:
    a1, a2, base = complete(server, "a1"), complete(server, "a2"), complete(server, "tiny:base")
    assert len({a1, a2, base}) == 3
    assert complete(server, "tiny") == a1
    listing = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()
    assert listing["default"] == "a1" and [a["name"] for a in listing["data"]] == ["a1", "a2"]


def test_models_list_adapters_with_parent(server: Server) -> None:
    models = {m.id: m for m in server.client().models.list().data}
    # minilm: the default embedding model; a3: in BENTOSERVICE_ADAPTER_DIRS; any others: the store's adapters of tiny
    # (the store outlives test runs), all served on request
    assert {"tiny", "a1", "a2", "a3", "minilm"} <= set(models)
    assert all(m.parent == "tiny" for name, m in models.items() if name not in ("tiny", "minilm"))
    assert models["a1"].parent == "tiny" and models["tiny"].parent is None
    assert (models["a1"].tier, models["a3"].tier) == ("gpu", "disk")
    assert server.client().models.retrieve("a2").parent == "tiny"


def test_switch_default(server: Server) -> None:
    a2, base = complete(server, "a2"), complete(server, "tiny:base")
    try:
        assert post(server, "/adapters", {"adapter_name": "a2"}).json()["default"] == "a2"
        assert complete(server, "tiny") == a2
        assert post(server, "/adapters", {"adapter_name": None}).json()["default"] is None
        assert complete(server, "tiny") == base
    finally:
        post(server, "/adapters", {"adapter_name": "a1"})


def test_mixed_concurrent_requests_equal_sequential(server: Server) -> None:
    jobs = [(model, f"{PROMPT} {i}") for i, model in enumerate(["a1", "a2", "tiny:base", "tiny"] * 2)]
    sequential = [complete(server, model, prompt) for model, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: complete(server, *job), jobs))
    assert concurrent == sequential


def test_runtime_load_and_unload(server: Server, adapters: dict[str, Path]) -> None:
    loaded = post(server, "/load_lora_adapter", {"lora_name": "custom", "lora_path": str(adapters["a3"])})
    assert loaded.status_code == 200 and "custom" in loaded.text
    a3 = complete(server, "custom")
    assert a3 not in (complete(server, "a1"), complete(server, "tiny:base"))
    assert post(server, "/unload_lora_adapter", {"lora_name": "custom"}).status_code == 200
    with pytest.raises(openai.NotFoundError):  # a3's folder is still served by its own name, not this one
        complete(server, "custom")
    assert complete(server, "a3") == a3
    again = post(server, "/adapters/load", {"adapter_id": str(adapters["a3"]), "adapter_name": "again"})
    assert again.status_code == 200 and "again" in [a["name"] for a in again.json()["data"]]
    assert complete(server, "again") == a3
    assert post(server, "/adapters/unload", {"adapter_name": "again"}).status_code == 200


def test_load_from_model_store(server: Server, adapters: dict[str, Path]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoservice.cli",
            "import-adapter",
            "tiny-a2",
            "--adapter-id",
            str(adapters["a2"]),
            "--base",
            "tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    stored = store.get("tiny-a2:latest")
    assert stored.kind == "adapter" and stored.base == "tiny"
    listing = subprocess.run([sys.executable, "-m", "bentoservice.cli", "models"], capture_output=True, text=True)
    assert "└─ tiny-a2:" in listing.stdout
    assert post(server, "/adapters/load", {"adapter_id": "tiny-a2"}).status_code == 200
    try:
        assert complete(server, "tiny-a2") == complete(server, "a2")
    finally:
        post(server, "/adapters/unload", {"adapter_name": "tiny-a2"})


def _broken_adapters(root: Path, outside: Path, adapters: dict[str, Path], tiny_dir: Path) -> dict[str, str]:
    """Each case: a path to load, in the allowed folder unless the case is about leaving it."""
    (root / "missing").mkdir(exist_ok=True)
    (root / "missing" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    make_adapter(root / "other", make_tiny_model(outside / "narrow", tiny_dir, hidden=32), seed=4)
    make_adapter(root / "rank16", tiny_dir, seed=5, r=16)
    renamed = root / "renamed"
    renamed.mkdir(exist_ok=True)
    (renamed / "adapter_config.json").write_text((adapters["a1"] / "adapter_config.json").read_text())
    weights = load_file(str(adapters["a1"] / "adapter_model.safetensors"))
    save_file(
        {k.replace("q_proj", "qkv_proj"): v for k, v in weights.items()}, str(renamed / "adapter_model.safetensors")
    )
    diverged = root / "diverged"  # a fine-tune whose loss went NaN: its B holds NaN
    diverged.mkdir(exist_ok=True)
    (diverged / "adapter_config.json").write_text((adapters["a1"] / "adapter_config.json").read_text())
    save_file(
        {k: v * float("nan") if "lora_B" in k else v for k, v in weights.items()},
        str(diverged / "adapter_model.safetensors"),
    )
    make_adapter(outside / "elsewhere", tiny_dir, seed=6)
    link = root / "link-out"
    if not link.exists():
        link.symlink_to(outside / "elsewhere")
    return {
        "missing file": str(root / "missing"),
        "different base": str(root / "other"),
        "rank": str(root / "rank16"),
        "target": str(renamed),
        "dotdot": f"{root}/../{root.name}/a1",
        "symlink out": str(link),
        "outside": str(outside / "elsewhere"),
        "no such folder": str(root / "nope"),
        "diverged": str(diverged),
    }


def test_refusals(
    server: Server, adapters: dict[str, Path], adapter_root: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    before = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()
    reasons = {
        "missing file": "adapter_model.safetensors",
        "different base": "different base model",
        "rank": "max_lora_rank",
        "target": "qkv_proj",
        "dotdot": "..",
        "symlink out": "outside",
        "outside": "outside",
        "no such folder": "no adapter folder",
        "diverged": "NaN or inf",
    }
    for case, path in _broken_adapters(adapter_root, tmp_path, adapters, tiny_dir).items():
        response = post(server, "/load_lora_adapter", {"lora_name": case.replace(" ", "-"), "lora_path": path})
        assert response.status_code == 400, (case, response.text)
        assert reasons[case] in response.json()["error"]["message"], (case, response.text)
    assert httpx.get(f"{server.url}/v1/adapters", timeout=10).json() == before
    with pytest.raises(openai.NotFoundError):
        complete(server, "no-such-adapter")
    assert post(server, "/adapters", {"adapter_name": "no-such-adapter"}).status_code == 400
    assert post(server, "/adapters/unload", {"adapter_name": "no-such-adapter"}).status_code == 404
    refused = post(server, "/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(adapters["a3"])})
    assert refused.status_code == 400
    assert complete(server, "a1") == complete(server, "tiny")


def test_fine_tune_path_env_sets_default(tiny, adapters: dict[str, Path]) -> None:
    server = Server("tiny", env={"BENTOSERVICE_TINY_FINE_TUNE_PATH": str(adapters["a2"])})
    try:
        listing = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()
        assert listing["default"] == "a2"
        assert complete(server, "tiny") == complete(server, "a2") != complete(server, "tiny:base")
    finally:
        server.stop()


def _greedy(model_name: str, request_model: str, adapter: Path | None = None) -> str:
    from bentoservice.engine.params import Delta, SamplingParams
    from bentoservice.engine.served import ServedModel

    stored = store.resolve_base(model_name)
    served = ServedModel(stored.name, stored.model_id, stored.path, Settings())
    try:
        if adapter is not None:
            served.load_adapter("x", adapter)

        async def run() -> str:
            stream = served.generate(
                served.encode_text(PROMPT), SamplingParams(max_tokens=12, temperature=0), served.choose(request_model)
            )
            return "".join([e.text async for e in stream if isinstance(e, Delta)])

        return asyncio.run(run())
    finally:
        served.close()


def test_merged_model_answers_like_base_plus_adapter(tiny, adapters: dict[str, Path]) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoservice.cli",
            "merge",
            "--base",
            "tiny",
            "--lora",
            str(adapters["a1"]),
            "--target",
            "tiny-merged",
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    merged = store.resolve_base("tiny-merged")
    assert merged.labels["source"].startswith("merge:")
    assert _greedy("tiny-merged", "tiny-merged") == _greedy("tiny", "x", adapters["a1"])
