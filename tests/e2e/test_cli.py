"""The `bentoservice` command: importing models from offline sources, listing the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bentoml
from transformers import AutoModelForCausalLM

from bentoservice import store


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bentoservice.cli", *args], capture_output=True, text=True)


def test_default_model_in_store(smollm2: store.StoredModel) -> None:
    stored = bentoml.models.get("smollm2:latest")
    assert stored.info.labels["kind"] == "base"
    assert stored.info.labels["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert stored.info.labels["architecture"] == "LlamaForCausalLM"
    folder = Path(stored.path)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 100_000_000


def test_import_from_local_folder(tiny_dir: Path) -> None:
    done = cli("import", "tinyfolder", "--model-id", str(tiny_dir))
    assert done.returncode == 0, done.stderr
    stored = store.resolve_base("tinyfolder")
    assert stored.labels["source"] == f"folder:{tiny_dir}"
    listing = cli("models")
    assert "tinyfolder:" in listing.stdout and "smollm2:" in listing.stdout


def test_import_from_gguf_file(smollm2: store.StoredModel, tmp_path: Path) -> None:
    gguf = store.bases.bundled_gguf(store.card_for("smollm2").source)
    stored = store.import_model("smolgguf", str(gguf))
    assert stored.labels["source"] == f"gguf:{gguf}"
    assert (stored.path / "model.safetensors").stat().st_size == (smollm2.path / "model.safetensors").stat().st_size


def test_bad_sources_get_one_line_errors(tmp_path: Path) -> None:
    for source in (str(tmp_path), str(tmp_path / "missing.gguf"), "./not/a/thing/at/all"):
        done = cli("import", "broken", "--model-id", source)
        assert done.returncode == 1
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    offline = cli("import", "broken", "--model-id", "someone/some-model")
    assert offline.returncode == 1 and "hub" in offline.stderr and "Traceback" not in offline.stderr
    assert not [m for m in store.list_models() if m.name == "broken"]
