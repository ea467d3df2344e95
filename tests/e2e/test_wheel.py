"""The wheel installs and runs with no source tree: its model cards and the C source the engine compiles are in it.

The wheel is built offline from a copy of the project (`pip wheel --no-deps --no-build-isolation`: the shared
venv's setuptools) and installed with `pip install --no-deps` into a fresh venv made without pip; a .pth file in
that venv puts the shared venv's site-packages (torch, transformers, ...) after its own, so nothing is downloaded.
Everything runs from a folder outside the repository with PYTHONPATH naming an empty folder, so only the wheel's
bentoservice can be imported.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, Server

from bentoservice import store


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools builds in the source folder, and a build/ left there would carry stale modules.
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench", "deploy", "docs"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("bentoservice-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bentoservice/engine/cpu_kernels.c" in names and "bentoservice/store/model_cards/smollm2.yaml" in names
    venv.create(work / "venv", with_pip=False)
    python = work / "venv" / "bin" / "python"
    # --ignore-installed: this pip also sees the shared venv's editable bentoservice, which is not this venv's.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--ignore-installed",
            "-q",
            str(wheel),
        ],
        check=True,
        cwd=work,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "shared-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def wheel_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The tests' environment, with PYTHONPATH naming an empty folder instead of the source tree."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(tmp_path / "empty"), **extra}


def test_the_wheel_finds_its_cards_and_lists_the_store(
    wheel_python: Path, tiny: store.StoredModel, tmp_path: Path
) -> None:
    found = subprocess.run(
        [
            wheel_python,
            "-c",
            "import bentoservice, bentoservice.store as s; print(bentoservice.__file__); print(sorted(s.cards()))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=wheel_env(tmp_path),
    ).stdout
    location, cards = found.splitlines()
    assert not Path(location).is_relative_to(ROOT) and "'smollm2'" in cards
    listing = subprocess.run(
        [wheel_python.parent / "bentoservice", "models"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=wheel_env(tmp_path),
    ).stdout
    assert tiny.tag in listing


def test_the_wheel_serves_a_chat_on_its_compiled_cpu_kernels(
    wheel_python: Path, tiny: store.StoredModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"  # a cache of its own: the kernels are built from the wheel's C source
    server = Server(
        "tiny", python=str(wheel_python), cwd=str(tmp_path), env=wheel_env(tmp_path, XDG_CACHE_HOME=str(cache))
    )
    try:
        reply = server.client().chat.completions.create(
            model="tiny", max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi"}]
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        assert list((cache / "bentoservice" / "native").glob("cpu_kernels-*.so")), server.output()[-2000:]
    finally:
        server.stop()
