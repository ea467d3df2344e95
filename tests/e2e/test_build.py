"""Bentos per hardware target: bento.yaml and Dockerfile, a served CPU bento, --containerize, BentoCloud configs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest
import yaml
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from bentoml._internal.utils.cattr import bentoml_cattr
from conftest import ROOT, Server, free_port
from test_adapters import make_adapter

from bentoservice import build, store

TORCH_PIN = next(line for line in build.project_requirements() if line.startswith("torch=="))
EXPECTED = {
    "cpu": {
        "from": "python:3.11-slim",
        "resources": {"cpu": "2", "memory": "8Gi"},
        "present": ["--extra-index-url https://download.pytorch.org/whl/cpu", f"{TORCH_PIN}+cpu"],
        "absent": ["bitsandbytes", "optimum-habana"],
        # build-essential: BentoML's own, a C compiler for the CPU LoRA kernel
        "dockerfile": ["ENV UV_INDEX_STRATEGY=$UV_INDEX_STRATEGY", "build-essential"],
        "instance_type": "cpu.4",
    },
    "cuda": {
        "from": "nvidia/cuda:13.0.2-runtime-ubuntu24.04",
        "resources": {"cpu": "4", "memory": "16Gi", "gpu": 1, "gpu_type": "nvidia-l4"},
        "present": [
            "--extra-index-url https://download.pytorch.org/whl/cu130",
            f"{TORCH_PIN}+cu130",
            "bitsandbytes==0.50.2",
            "liger-kernel==0.8.5",
            "kernels==0.17.2",
        ],
        "absent": ["optimum-habana"],
        "dockerfile": [
            "RUN python3 -m pip install --break-system-packages uv",
            "ENV UV_INDEX_STRATEGY=$UV_INDEX_STRATEGY",
        ],
        "instance_type": "gpu.l4.1",
    },
    "gaudi": {
        "from": "vault.habana.ai/gaudi-docker/1.24.0/ubuntu24.04/habanalabs/pytorch-installer-2.10.0:latest",
        "resources": {"cpu": "16", "memory": "64Gi"},
        "present": ["optimum-habana==1.21.2", "transformers==4.55.4", "accelerate==1.10.1", "peft==0.17.1"],
        "absent": ["torch", "trl", "bitsandbytes", "--extra-index-url"],
        "dockerfile": [
            "ENV UV_EXCLUDE=$UV_EXCLUDE",
            "uv venv --python 3.12 /app/.venv",
            "include-system-site-packages = true",
        ],
        "instance_type": "gaudi2.1",
    },
}


def bentoservice(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path else {})}
    return subprocess.run([sys.executable, "-m", "bentoservice.cli", *args], capture_output=True, text=True, env=env)


def bento_yaml(tag: str) -> dict:
    return yaml.safe_load((Path(bentoml.bentos.get(tag).path) / "bento.yaml").read_text())


def requirements(tag: str) -> list[str]:
    return (Path(bentoml.bentos.get(tag).path) / "env" / "python" / "requirements.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("build") / "a1", tiny_dir, seed=1)


@pytest.fixture(scope="module")
def builds(tiny: store.StoredModel, adapter: Path) -> Iterator[dict[str, subprocess.CompletedProcess]]:
    """`bentoservice build tiny` per target: cpu with an adapter folder; cuda with --containerize and no container
    engine on PATH."""
    runs = {
        "cpu": bentoservice("build", "tiny", "--adapter-id", str(adapter), "--adapter-name", "build-a1"),
        "cuda": bentoservice(
            "build", "tiny", "--target", "cuda", "--containerize", path=str(Path(sys.executable).parent)
        ),
        "gaudi": bentoservice("build", "tiny", "--target", "gaudi"),
    }
    yield runs
    for run in runs.values():
        if run.stdout.strip():
            bentoml.bentos.delete(run.stdout.split()[0])


@pytest.fixture(scope="module")
def tags(builds: dict[str, subprocess.CompletedProcess]) -> dict[str, str]:
    for target, run in builds.items():
        assert run.returncode == (1 if target == "cuda" else 0), run.stderr
    return {target: run.stdout.split()[0] for target, run in builds.items()}


@pytest.mark.parametrize("target", EXPECTED)
def test_bento_per_target(target: str, tags: dict[str, str], tiny: store.StoredModel) -> None:
    expected, info = EXPECTED[target], bento_yaml(tags[target])
    assert info["args"]["target"] == target and info["name"] == f"tiny-{target}"
    (service,) = info["services"]
    assert tiny.tag in [model["tag"] for model in service["models"]]
    assert service["config"]["resources"] == expected["resources"]
    assert {"name": "BENTOSERVICE_MODEL", "value": tiny.tag, "stage": "all"} in info["envs"]
    lines = requirements(tags[target])
    assert lines == info["image"]["python_requirements"].splitlines()
    assert all(line in lines for line in expected["present"])
    assert not [line for line in lines if line.startswith(tuple(expected["absent"]))]
    bento = bentoml.bentos.get(tags[target])
    assert (Path(bento.path) / "src" / "bentoservice" / "engine" / "cpu_kernels.c").is_file()
    dockerfile = build.dockerfile(bento).read_text()
    assert f"FROM {expected['from']} AS base-container" in dockerfile
    assert all(line in dockerfile for line in expected["dockerfile"])
    assert "uv --directory $INSTALL_ROOT pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile


def test_pins_follow_pyproject(tags: dict[str, str]) -> None:
    """Every pyproject pin reaches the CPU and CUDA images as it is, torch as its wheel-index build."""
    for target in ("cpu", "cuda"):
        lines = requirements(tags[target])
        assert [line for line in build.project_requirements() if line not in lines] == [TORCH_PIN]


def test_adapter_folder_is_referenced_from_the_store(tags: dict[str, str], adapter: Path) -> None:
    info = bento_yaml(tags["cpu"])
    envs = {env["name"]: env["value"] for env in info["envs"]}
    (spec,) = json.loads(envs["BENTOSERVICE_ADAPTERS"])
    assert spec["name"] == "build-a1"
    stored = store.get(spec["id"])
    assert stored.kind == "adapter" and stored.base == "tiny" and spec["id"] == stored.tag
    assert spec["id"] in [model["tag"] for model in info["services"][0]["models"]]
    assert str(adapter) not in json.dumps({"envs": info["envs"], "args": info["args"]})


def test_containerize_without_an_engine_keeps_the_dockerfile(
    builds: dict[str, subprocess.CompletedProcess], tags: dict[str, str]
) -> None:
    error = builds["cuda"].stderr.strip().splitlines()[-1]
    dockerfile = build.dockerfile(bentoml.bentos.get(tags["cuda"]))
    assert error == (
        f"error: no container engine is running (tried docker, podman, nerdctl, buildah): {tags['cuda']} "
        f"was not containerized; its Dockerfile is {dockerfile}"
    )
    assert dockerfile.is_file()


class BentoServer(Server):
    """`bentoml serve TAG`, waited for, queried and stopped as the source-tree Server is."""

    def __init__(self, tag: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bento-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(self.port), "--host", "127.0.0.1"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=os.environ,
            start_new_session=True,
        )
        self.wait_ready()


def test_cpu_bento_serves_chat_completions(tags: dict[str, str]) -> None:
    server = BentoServer(tags["cpu"])
    try:
        client = server.client()
        models = {model.id: model for model in client.models.list().data}
        assert {"tiny", "build-a1"} <= set(models) and models["build-a1"].parent == "tiny"  # minilm too, when stored
        for model in ("tiny", "build-a1", "tiny:base"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
            )
            assert reply.choices[0].message.content and reply.model == model
    finally:
        server.stop()


def test_default_bentofile_builds_the_cpu_bento(smollm2: store.StoredModel) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    try:
        info = bento_yaml(tag)
        assert info["args"] == {"target": "cpu"}
        assert smollm2.tag in [model["tag"] for model in info["services"][0]["models"]]
        assert {"name": "BENTOSERVICE_MODEL", "value": "smollm2", "stage": "all"} in info["envs"]
        assert f"{TORCH_PIN}+cpu" in requirements(tag)
        assert "FROM python:3.11-slim AS base-container" in build.dockerfile(bentoml.bentos.get(tag)).read_text()
    finally:
        bentoml.bentos.delete(tag)


def test_build_arguments_take_store_tags_only() -> None:
    args = build.BentoArgs(model="tiny:abc", adapters='[{"id": "a1:def", "name": "a1"}]')
    assert args.adapters[0].id == "a1:def"
    for bad in ({"model": "/some/folder"}, {"adapters": [{"id": "./adapter"}]}, {"target": "tpu"}):
        with pytest.raises(ValueError):
            build.BentoArgs(**bad)


@pytest.mark.parametrize("target", EXPECTED)
def test_deployment_configs(target: str, tags: dict[str, str]) -> None:
    path = build.DEPLOY_DIR / f"{target}.yaml"
    config = build.load_deployment(path)
    (service,) = config.services.values()
    assert list(config.services) == [bentoml.bentos.get(tags[target]).info.entry_service]
    assert service.instance_type == EXPECTED[target]["instance_type"]
    assert config.secrets == ["bentoservice-api-key"] and not config.access_authorization
    # BentoCloud's own schema takes it as `bentoml deploy` will send it.
    bentoml_cattr.structure({**yaml.safe_load(path.read_text()), "bento": tags[target]}, CreateDeploymentSchema)


def test_deploy_dry_run_names_the_bento_and_its_target_config(tags: dict[str, str]) -> None:
    done = bentoservice("deploy", tags["cuda"], "--name", "demo", "--dry-run")
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command[1:4] == ["-m", "bentoml", "deploy"] and command[4] == "--config-dict"
    config = json.loads(command[5])
    assert config["bento"] == tags["cuda"] and config["name"] == "demo"
    assert config["services"]["bentoservice"]["instance_type"] == "gpu.l4.1"


def test_invalid_deployment_config_is_one_line(tmp_path: Path) -> None:
    config = yaml.safe_load((build.DEPLOY_DIR / "cpu.yaml").read_text())
    config["services"]["bentoservice"]["scaling"] = {"min_replicas": 3, "max_replicas": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(build.BuildError, match="min_replicas is above max_replicas"):
        build.load_deployment(tmp_path / "bad.yaml")
