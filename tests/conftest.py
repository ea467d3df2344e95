"""Shared fixtures: an isolated model store, the real default model, tiny random models, real servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The store persists between runs (the default model's import takes ~30 s); everything else is per run.
_RUN = Path(tempfile.mkdtemp(prefix="bentoservice-test-"))
os.environ.update(
    {
        "BENTOML_HOME": str(ROOT / ".cache" / "test-bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "XDG_CACHE_HOME": str(_RUN / "cache"),
        "BENTOSERVICE_DATA_DIR": str(_RUN / "data"),
    }
)

import httpx  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402

from bentoservice import store  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2() -> store.StoredModel:
    """The real default model, imported once from the bundled GGUF."""
    return store.ensure_base("smollm2")


def make_tiny_model(
    folder: Path,
    tokenizer_dir: Path,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    leaning: dict[str, float] | None = None,
) -> Path:
    """A random-weight Llama with the real SmolLM2 tokenizer: fast, and its output is deterministic.

    `leaning` {token: weight}: an untied output layer whose rows for those single-token words are `weight` times one
    random direction (negative: the opposite way), so the model samples them often and an adapter can learn to
    say one of them (a random model's near-uniform output over 49k tokens gives a reward nothing to learn from)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=leaning is None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if leaning:
        direction = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
        with torch.no_grad():
            for word, weight in leaning.items():
                (token,) = tokenizer.encode(word)
                model.lm_head.weight[token] = weight * direction
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(smollm2: store.StoredModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), smollm2.path)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> store.StoredModel:
    """The tiny model in the store under the name `tiny` (re-imported each run: its weights are per run)."""
    return store.import_model("tiny", str(tiny_dir))


def packed_batch(examples: list[list[int]]) -> dict[str, Any]:
    """TRL's padding-free batch of these token ids, every token a label."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": ids, "labels": ids} for ids in examples])


class Server:
    """A real `bentoservice start` process on a free port (`python`: the interpreter that runs it)."""

    def __init__(
        self,
        model: str,
        *args: str,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        cwd: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False)
        cmd = [python, "-m", "bentoservice.cli", "start", model, "--port", str(self.port), "--host", "127.0.0.1", *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=cwd,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready: {self.output()[-3000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def _tree(self) -> list[psutil.Process]:
        """BentoML's workers run in sessions of their own: find them as the arbiter's children."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """A graceful stop (SIGTERM), then nothing of the server is left running."""
        children = self._tree()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:
            if child.is_running():
                child.kill()

    def crash(self) -> None:
        """The machine goes down: every process of the server dies at once."""
        for process in [*self._tree(), psutil.Process(self.proc.pid)]:
            process.kill()
        self.proc.wait()

    def client(self, api_key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def smollm2_server(smollm2: store.StoredModel) -> Iterator[Server]:
    server = Server("smollm2")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny: store.StoredModel) -> Iterator[Server]:
    server = Server("tiny", env={"BENTOSERVICE_MAX_QUEUED": "4", "BENTOSERVICE_MAX_RUNNING": "4"})
    yield server
    server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_RUN, ignore_errors=True)
