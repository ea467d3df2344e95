"""Where state lives: `bentoservice state` and `reset` through the real CLI, two servers with isolated state side by
side, what `bentoservice start` prints once ready, and `make serve`'s PORT and HOST."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, Server

CHATS = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, ahoy!"}]}\n'


def isolated(root: Path) -> dict[str, str]:
    """The variables that give a run state of its own (README: Where state lives)."""
    return {
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOSERVICE_DATA_DIR": str(root / "data"),
        "XDG_CACHE_HOME": str(root / "cache"),
    }


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bentoservice.cli", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def homes(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Two isolated states, each with the tiny model imported into its own store, and a model of another project."""
    envs = [isolated(tmp_path_factory.mktemp(name)) for name in ("a", "b")]
    for env in envs:
        assert cli(env, "import", "tiny", "--model-id", str(tiny_dir)).returncode == 0
    other = "import bentoml\nwith bentoml.models.create('not-ours'):\n    pass\n"
    subprocess.run([sys.executable, "-c", other], env={**os.environ, **envs[0]}, check=True, timeout=120)
    return envs


@pytest.fixture(scope="module")
def servers(homes: list[dict[str, str]]):
    started = [Server("tiny", "--embedding-model", "none", env=env) for env in homes]
    yield started
    for server in started:
        server.stop()


def counts(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_state_prints_every_location(homes: list[dict[str, str]]) -> None:
    env = homes[0]
    result = cli(env, "state")
    assert result.returncode == 0, result.stderr
    data = Path(env["BENTOSERVICE_DATA_DIR"])
    cache = Path(env["XDG_CACHE_HOME"]) / "bentoservice"
    for where in [
        env["BENTOML_HOME"],
        f"{env['BENTOML_HOME']}/models",
        data,
        data / "bentoservice.db",
        data / "files",
        data / "jobs",
        cache / "fine_tune",
        cache / "native",
    ]:
        assert f"    {where}    (" in result.stdout, where
    # the tiny model is ours; the other project's model in the same store is not counted; nothing ran yet
    assert counts(result.stdout) == "1 base models, 0 adapters, 0 jobs, 0 files"
    assert not data.exists(), "reading the state must not create it"


def test_two_servers_with_isolated_state(servers: list[Server], homes: list[dict[str, str]]) -> None:
    a, b = servers
    assert a.port != b.port
    uploaded = a.client().files.create(file=("pirate.jsonl", CHATS), purpose="fine-tune")
    assert [f.id for f in a.client().files.list()] == [uploaded.id]
    assert list(b.client().files.list()) == []
    with pytest.raises(openai.NotFoundError):
        b.client().files.retrieve(uploaded.id)
    assert Path(homes[0]["BENTOSERVICE_DATA_DIR"], "files", uploaded.id).is_file()
    assert not Path(homes[1]["BENTOSERVICE_DATA_DIR"], "files").exists()
    assert counts(cli(homes[0], "state").stdout).endswith("0 jobs, 1 files")
    assert counts(cli(homes[1], "state").stdout).endswith("0 jobs, 0 files")


def test_start_prints_the_urls_once_ready(servers: list[Server]) -> None:
    server = servers[0]
    output = server.output()
    banner = output[output.index("bentoservice is ready, serving tiny:") :]
    base = f"http://localhost:{server.port}"
    assert f"API base URL  {base}/v1\n" in banner
    assert f"docs          {base}/\n" in banner
    assert f"try           curl {base}/v1/chat/completions -H 'Content-Type: application/json'" in banner
    assert httpx.get(f"{server.url}/").status_code == 200  # the docs page
    console = httpx.get(f"{server.url}/ui/").status_code != 404
    assert (f"console       {base}/ui/" in banner) == console


def test_reset_asks_first_and_deletes_only_this_projects_state(
    servers: list[Server], homes: list[dict[str, str]]
) -> None:
    for server in servers:
        server.stop()
    env = homes[0]
    data = Path(env["BENTOSERVICE_DATA_DIR"])
    for answer in ["", "n\n"]:  # no answer (no terminal) and "no" delete nothing
        refused = cli(env, "reset", stdin=answer)
        assert refused.returncode == 1 and "Aborted" in refused.stderr
        assert "Delete? [y/N]" in refused.stdout and f"    {data}\n" in refused.stdout
        assert data.is_dir()
    done = cli(env, "reset", "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted model tiny:" in done.stdout and f"deleted {data}\n" in done.stdout
    assert not data.exists()
    assert counts(cli(env, "state").stdout) == "0 base models, 0 adapters, 0 jobs, 0 files"
    listed = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "not-ours" in listed and "tiny" not in listed
    assert counts(cli(homes[1], "state").stdout).startswith("1 base models")  # the other state is untouched


def test_make_serve_takes_port_and_host() -> None:
    dry = subprocess.run(
        ["make", "-n", "serve", "PORT=3010", "HOST=127.0.0.1"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert ".venv/bin/bentoservice start --port 3010 --host 127.0.0.1" in dry
    default = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/bentoservice start --port 3000 --host 0.0.0.0" in default
