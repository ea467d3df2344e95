"""A separate, locked-down process for user code (python graders), from Linux namespaces (util-linux's unshare):

- no network: a new network namespace holds only a loopback interface that is down;
- none of the service's files: a new mount namespace lays empty tmpfs over the home folder, the data folder, the
  model store, the cache, /tmp and /dev/shm, and binds the Python interpreter and its packages back read-only;
  the process starts in that empty /tmp; a new PID namespace hides the service's processes;
- as root, the code runs as `nobody` (no capabilities, no new privileges); as another user, inside a user namespace
  mapped to that user;
- CPU seconds, address space, open files, file size (and processes, as `nobody`) limited with prlimit; a wall
  timeout; a minimal environment (no API keys, no BENTOSERVICE_* settings).

When the platform cannot make such a process (no unshare, namespaces not allowed), `available()` says why and
python graders are refused."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 10
    memory_mb: int = 1024
    wall_seconds: float = 30.0


def _hidden() -> list[Path]:
    from bentoservice.config import cache_root, get_settings
    from bentoservice.store.models import bentoml_home

    settings = get_settings()
    paths = {
        p.resolve() for p in (Path.home(), settings.data_dir, bentoml_home(), cache_root(), Path("/tmp")) if p.is_dir()
    }
    # A folder inside another hidden one is hidden with it (and its mount point would be gone).
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


def _kept() -> list[Path]:
    return sorted({Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def _script() -> str:
    """The shell that lays the mounts out inside the new namespaces, then runs the command given as "$@"."""
    hidden, kept = _hidden(), _kept()
    under = [k for k in kept if any(k.is_relative_to(h) for h in hidden)]
    lines = ["set -e", "mkdir -p /dev/shm", "mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm"]
    # Stage what must stay visible in /dev/shm (about to be hidden anyway), hide, then bind it back read-only.
    for n, path in enumerate(under):
        lines += [f"mkdir -p /dev/shm/keep{n}", f"mount --bind -o ro {shlex.quote(str(path))} /dev/shm/keep{n}"]
    for path in hidden:
        mode = "1777" if path == Path("/tmp") else "755"
        lines.append(f"mount -t tmpfs -o size=64m,mode={mode} tmpfs {shlex.quote(str(path))}")
    for n, path in enumerate(under):
        quoted = shlex.quote(str(path))
        lines += [f"mkdir -p {quoted}", f"mount --bind -o ro /dev/shm/keep{n} {quoted}", f"umount /dev/shm/keep{n}"]
    lines += ["rmdir /dev/shm/keep* 2>/dev/null || true", "cd /tmp", 'exec "$@"']
    return "\n".join(lines)


def command(argv: list[str], limits: Limits) -> list[str]:
    root = os.geteuid() == 0
    namespaces = ["--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
    if not root:
        namespaces = ["--user", "--map-root-user", *namespaces]
    prlimit = [
        "prlimit",
        f"--cpu={limits.cpu_seconds}",
        f"--as={limits.memory_mb * 1024 * 1024}",
        "--nofile=64",
        f"--fsize={32 * 1024 * 1024}",
        *(["--nproc=64"] if root else []),
        "--",
    ]
    drop = (
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ]
        if root
        else []
    )
    return ["unshare", *namespaces, "--", "sh", "-c", _script(), "sandbox", *drop, *prlimit, *argv]


ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def run(argv: list[str], stdin: bytes, limits: Limits) -> subprocess.CompletedProcess[bytes]:
    """Raises subprocess.TimeoutExpired past the wall timeout (the namespace's processes all die with it)."""
    return subprocess.run(
        command(argv, limits), input=stdin, capture_output=True, env=ENV, timeout=limits.wall_seconds, check=False
    )


@lru_cache
def unavailable() -> str | None:
    """Why no sandbox can be made here, or None when one can (tried once: a sandboxed `python -c pass`)."""
    missing = [tool for tool in ("unshare", "prlimit", "setpriv", "sh") if shutil.which(tool) is None]
    if sys.platform != "linux" or missing:
        return f"they need Linux namespaces through util-linux ({', '.join(missing) or sys.platform} missing)"
    try:
        done = run([sys.executable, "-I", "-c", "pass"], b"", Limits(wall_seconds=30))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"a sandboxed process could not start: {exc}"
    if done.returncode != 0:
        return f"this platform refuses the namespaces they need: {done.stderr.decode(errors='replace').strip()[-300:]}"
    return None
