"""Bentos per hardware target (cpu, cuda, gaudi), their containers, and BentoCloud deployments.

A bento is built from bentofile.yaml with BentoML build arguments (`target`, `model`, `adapters`). The service reads
them back through `bentoml.use_arguments()`, both when it is built and when the bento is served, and takes from them
its image, resources, envs and references to store models. Without arguments (serving from source) it takes none.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import bentoml
import yaml
from bentoml.images import Image
from bentoml.models import BentoModel
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bentoservice import store
from bentoservice.config import AdapterSpec, get_settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
BENTOFILE = ROOT / "bentofile.yaml"
DEPLOY_DIR = ROOT / "deploy"
TORCH_INDEX = "https://download.pytorch.org/whl"
# uv leaves these out of every resolution on Gaudi: Habana's image provides them (see the gaudi target).
GAUDI_EXCLUDES = "/app/uv-exclude.txt"
CONTAINER_ENGINES = ("docker", "podman", "nerdctl", "buildah")

TargetName = Literal["cpu", "cuda", "gaudi"]


class BuildError(ValueError):
    """A bento that cannot be built or deployed as asked; the message is one line for the user."""


def project_requirements() -> list[str]:
    """The project's own dependencies, as pyproject.toml pins them (the bento ships pyproject.toml)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


class Target(BaseModel):
    """What one kind of hardware needs: image, packages, envs and service resources."""

    base_image: str = ""
    """Empty: BentoML's python:<version>-slim."""
    python_version: str = "3.11"
    system_packages: list[str] = []
    commands: list[str] = []
    """Run before the bento's virtual environment is created and its packages installed."""
    torch_build: str | None
    """The PyTorch wheel-index build of the pinned torch ("cpu", "cu130"); None leaves torch to the base image."""
    pins: dict[str, str | None] = {}
    """Project requirements replaced by this target's, by package name; None leaves one out."""
    packages: list[str] = []
    post_commands: list[str] = []
    """Run after the packages are installed."""
    envs: dict[str, str] = {}
    resources: dict[str, Any]

    def requirements(self) -> list[str]:
        lines = [f"--extra-index-url {TORCH_INDEX}/{self.torch_build}"] if self.torch_build else []
        for line in project_requirements():
            name = canonicalize_name(Requirement(line).name)
            pinned = self._torch(line) if name == "torch" else self.pins.get(name, line)
            lines += [pinned] if pinned else []
        return lines + self.packages

    def _torch(self, line: str) -> str | None:
        """pyproject's `torch==2.13.0` as the wheel index's `torch==2.13.0+cu130`."""
        if self.torch_build is None:
            return None
        specifiers = list(Requirement(line).specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise BuildError(f"pyproject.toml must pin torch exactly (torch==X.Y.Z), not {line!r}")
        return f"torch=={specifiers[0].version}+{self.torch_build}"

    def image(self) -> Image:
        image = Image(base_image=self.base_image, python_version=self.python_version, lock_python_packages=False)
        if self.system_packages:
            image.system_packages(*self.system_packages)
        for command in self.commands:
            image.run(command)
        image.python_packages(*self.requirements())
        for command in self.post_commands:  # after python_packages(), Image.run() queues post-install commands
            image.run(command)
        return image


# uv prefers an extra index for every package it holds; the PyTorch index also mirrors numpy, jinja2 and other
# common packages at older versions, so uv must pick the best version across both indexes.
_TORCH_INDEX_ENVS = {"UV_INDEX_STRATEGY": "unsafe-best-match"}
# Ubuntu 24.04 marks its Python as externally managed; BentoML's Dockerfile then needs uv on the system Python.
_INSTALL_UV = "python3 -m pip install --break-system-packages uv"

TARGETS: dict[TargetName, Target] = {
    "cpu": Target(torch_build="cpu", envs=_TORCH_INDEX_ENVS, resources={"cpu": "2", "memory": "8Gi"}),
    # PyPI's torch 2.13.0 for Linux is the CUDA 13.0 build (cuda-toolkit 13.0.3): match its runtime image.
    "cuda": Target(
        base_image="nvidia/cuda:13.0.2-runtime-ubuntu24.04",
        system_packages=["python3-pip"],
        commands=[_INSTALL_UV],
        torch_build="cu130",
        packages=["bitsandbytes==0.50.2", "liger-kernel==0.8.5", "kernels==0.17.2"],
        envs=_TORCH_INDEX_ENVS,
        resources={"cpu": "4", "memory": "16Gi", "gpu": 1, "gpu_type": "nvidia-l4"},
    ),
    # optimum-habana 1.21.2 is validated on Intel Gaudi software 1.24 (torch 2.10) and pins transformers 4.55.
    # BentoML installs packages into a fresh venv, which would hide Habana's torch: uv leaves torch out of the
    # resolution (UV_EXCLUDE) and, once the packages are in, the venv is given the system site-packages, where
    # Habana's torch and habana_frameworks live. Packages in the venv come first.
    "gaudi": Target(
        python_version="3.12",
        base_image="vault.habana.ai/gaudi-docker/1.24.0/ubuntu24.04/habanalabs/pytorch-installer-2.10.0:latest",
        commands=[_INSTALL_UV, f"mkdir -p /app && printf '%s\\n' torch torchvision torchaudio > {GAUDI_EXCLUDES}"],
        torch_build=None,
        pins={
            "trl": None,
            "transformers": "transformers==4.55.4",
            "peft": "peft==0.17.1",
            "accelerate": "accelerate==1.10.1",
            "datasets": "datasets==3.6.0",
        },
        packages=["optimum-habana==1.21.2"],
        post_commands=[
            "sed -i 's/^include-system-site-packages = false$/include-system-site-packages = true/' "
            "/app/.venv/pyvenv.cfg"
        ],
        envs={
            "UV_EXCLUDE": GAUDI_EXCLUDES,
            "HABANA_VISIBLE_DEVICES": "all",
            "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
        },
        # BentoML has no Gaudi resource type: the deployment config's instance type picks the Gaudi nodes.
        resources={"cpu": "16", "memory": "64Gi"},
    ),
}


def _store_tag(value: str) -> str:
    bentoml.Tag.from_taglike(value)  # raises ValueError on anything that is not a store name or tag
    return value


class BentoArgs(BaseModel):
    """BentoML build arguments (`bentoml build --arg KEY=VALUE`); a bento keeps them and serves with them."""

    model_config = ConfigDict(extra="forbid")

    target: TargetName = "cpu"
    model: str = Field(default_factory=lambda: get_settings().model)
    """The base model: a store name, or the exact store tag that `bentoservice build` pins."""
    adapters: list[AdapterSpec] = []
    """Adapters by store tag, as BENTOSERVICE_ADAPTERS takes them; the first is the default."""

    @field_validator("model")
    @classmethod
    def _model_tag(cls, value: str) -> str:
        return _store_tag(value)

    @field_validator("adapters", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("adapters")
    @classmethod
    def _adapter_tags(cls, value: list[AdapterSpec]) -> list[AdapterSpec]:
        for spec in value:
            _store_tag(spec.id)
        return value

    def envs(self) -> list[dict[str, str]]:
        values = {"BENTOSERVICE_MODEL": self.model, **TARGETS[self.target].envs}
        if self.adapters:
            values["BENTOSERVICE_ADAPTERS"] = json.dumps([spec.model_dump() for spec in self.adapters])
        return [{"name": name, "value": value} for name, value in values.items()]

    def model_refs(self) -> dict[str, BentoModel]:
        refs = {"base_model": BentoModel(self.model)}
        refs.update({f"adapter_model_{i}": BentoModel(spec.id) for i, spec in enumerate(self.adapters)})
        return refs


def bento_args() -> BentoArgs | None:
    """The arguments of the bento being built or served; None when serving from source."""
    if not vars(bentoml.use_arguments()):
        return None
    return bentoml.use_arguments(BentoArgs)


def service_options(args: BentoArgs | None) -> dict[str, Any]:
    """`@bentoml.service` options for the bento's target: image, resources and envs."""
    if args is None:
        return {}
    target = TARGETS[args.target]
    return {"image": target.image(), "resources": target.resources, "envs": args.envs()}


def with_model_refs(args: BentoArgs | None) -> Callable[[type], type]:
    """A class decorator (below `@bentoml.service`) that adds the bento's models as BentoML model references:
    `bentoml build` records them in the bento, and containers and BentoCloud get them from the model store."""

    def decorate(cls: type) -> type:
        for name, ref in (args.model_refs() if args else {}).items():
            setattr(cls, name, ref)
        return cls

    return decorate


# --- building --------------------------------------------------------------------------------


def _stored_adapter(spec: AdapterSpec, base: store.StoredModel) -> AdapterSpec:
    """The adapter as a model-store tag: a folder or hub adapter goes into the store first, so that the bento
    references it instead of copying a path that exists only on this machine."""
    source = store.adapter_source(spec.id)
    if source.base is not None and source.base != base.name:
        raise BuildError(f"the adapter {spec.id!r} was made for {source.base!r}, not {base.name!r}")
    try:
        stored = store.get(spec.id)
    except store.StoreError:
        stored = store.save_adapter(spec.name or source.name, source.folder, base.name, {"source": spec.id})
    return AdapterSpec(id=stored.tag, name=spec.name or stored.name)


def build_bento(base: store.StoredModel, target: TargetName, adapters: list[AdapterSpec]) -> bentoml.Bento:
    """One bento of `base` for `target`, from bentofile.yaml, referencing base and adapters by store tag."""
    args = BentoArgs(target=target, model=base.tag, adapters=[_stored_adapter(spec, base) for spec in adapters])
    log.info("building %s for %s with %s", base.tag, target, [spec.id for spec in args.adapters] or "no adapters")
    # reload: the service module takes its arguments when imported; an earlier build in this process imported it.
    return bentoml.bentos.build_bentofile(
        str(BENTOFILE), name=f"{base.name}-{target}", build_ctx=str(ROOT), args=args.model_dump(), reload=True
    )


def dockerfile(bento: bentoml.Bento) -> Path:
    return Path(bento.path) / "env" / "docker" / "Dockerfile"


def container_engine() -> str | None:
    """The first container engine that answers (BentoML's own health check raises and prints the engine's errors)."""
    for engine in CONTAINER_ENGINES:
        binary = shutil.which(engine)
        try:
            if binary and subprocess.run([binary, "info"], capture_output=True, timeout=30).returncode == 0:
                return engine
        except subprocess.TimeoutExpired:
            log.debug("%s did not answer", engine)
    return None


def containerize(tag: str, engine: str) -> int:
    return subprocess.run([sys.executable, "-m", "bentoml", "containerize", tag, "--backend", engine]).returncode


# --- BentoCloud --------------------------------------------------------------------------------


class DeploymentEnv(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    value: str


class Scaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self


class ServiceDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_type: str
    scaling: Scaling
    envs: list[DeploymentEnv] = []


class DeploymentConfig(BaseModel):
    """The part of BentoCloud's deployment config (`bentoml deploy -f`) that deploy/*.yaml use."""

    model_config = ConfigDict(extra="forbid")

    name: str
    bento: str | None = None
    cluster: str | None = None
    access_authorization: bool = False
    secrets: list[str] = []
    envs: list[DeploymentEnv] = []
    services: dict[str, ServiceDeployment]


def load_deployment(path: Path) -> DeploymentConfig:
    try:
        return DeploymentConfig.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BuildError(f"{path}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from exc


def deploy_command(
    tag: str, config_path: Path | None = None, name: str | None = None, cluster: str | None = None
) -> list[str]:
    """`bentoml deploy` of a local bento with its target's deployment config (deploy/<target>.yaml)."""
    bento = bentoml.bentos.get(tag)
    target = bento.info.args.get("target")
    if config_path is None and target is None:
        raise BuildError(f"{bento.tag} has no target: build it with `bentoservice build` or pass --config")
    config = load_deployment(config_path or DEPLOY_DIR / f"{target}.yaml")
    overrides = {"bento": str(bento.tag), "name": name or config.name, "cluster": cluster or config.cluster}
    config = config.model_copy(update=overrides)
    return [sys.executable, "-m", "bentoml", "deploy", "--config-dict", config.model_dump_json(exclude_none=True)]
