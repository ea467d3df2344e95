"""The lean CPU pass's kernels (`cpu_kernels.c`), compiled on first use by the machine's C compiler.

On the CPU a decode step's small operations cost more in overhead than in arithmetic:
- `lora_add`: the LoRA updates of 4 groups of layers in each decoder layer; in torch each group costs a dozen
  small operations (gather the tokens by adapter, a batched product, scatter back, per layer), a fifth of a
  mixed-adapter step. The kernel does a group in one call.
- `rms_norm`: torch's takes about 50 us on a decode step's few rows (several passes, each its own operation).
They run on torch's OpenMP threads (the library links the OpenMP runtime torch has loaded).

The library is built once per machine into the cache folder, named by a hash of the source, the flags, the
compiler and the CPU (it is built for the CPU it runs on). Without a compiler, or where the build fails, the
engine keeps torch operations (`LeanModel`, `LoraGroup`), and says so in the log.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from bentoservice.config import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBRARIES = ["-lm"]


@dataclass(frozen=True)
class Kernels:
    lora_add: Callable[[int, int, int, int, int, int], None]
    """lora_add(&Group, &Pass, x, x_stride, y, y_stride): y += each token's LoRA update of x (data pointers of
    float32 rows of contiguous columns, row strides)."""
    rms_norm: Callable[[int, int, int, float, int, int, int, int], None]
    """rms_norm(x, x_stride, weight, eps, rows, columns, out, threads), out contiguous."""

    def norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """torch.rms_norm(x, weight.shape, weight, eps) of float32 rows [tokens, hidden] of contiguous columns."""
        out = torch.empty_like(x)
        self.rms_norm(
            x.data_ptr(),
            x.stride(0),
            weight.data_ptr(),
            eps,
            x.shape[0],
            x.shape[1],
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out


class Group(ctypes.Structure):
    """lora_group_t: a group's stacks (A side by side, one B per layer) and where each layer's columns start."""

    _fields_ = [
        ("in_features", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("layers", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("cols", ctypes.c_void_p),
        ("outs", ctypes.c_void_p),
    ]

    @classmethod
    def of(cls, a: torch.Tensor, targets: list[tuple[int, torch.Tensor]]) -> Group:
        """a: [stacked, in, layers * rank]; targets: (first output column, B stack [stacked, rank, out]) per layer."""
        count = len(targets)
        b = (ctypes.c_void_p * count)(*(stack.data_ptr() for _, stack in targets))
        cols = (ctypes.c_int64 * count)(*(column for column, _ in targets))
        outs = (ctypes.c_int64 * count)(*(stack.shape[2] for _, stack in targets))
        group = cls(
            a.shape[1],
            a.shape[2],
            count,
            targets[0][1].shape[1],
            a.data_ptr(),
            ctypes.addressof(b),
            ctypes.addressof(cols),
            ctypes.addressof(outs),
        )
        group.held = (a, targets, b, cols, outs)  # what the pointers point into
        return group


class Pass(ctypes.Structure):
    """lora_pass_t: a pass's tokens grouped by adapter (`Blocks`), and the threads to run on."""

    _fields_ = [
        ("threads", ctypes.c_int64),
        ("blocks", ctypes.c_int64),
        ("starts", ctypes.c_void_p),
        ("stacks", ctypes.c_void_p),
        ("order", ctypes.c_void_p),
    ]

    @classmethod
    def of(cls, starts: torch.Tensor, stacks: torch.Tensor, order: torch.Tensor) -> Pass:
        """int64 tensors: block g is the tokens order[starts[g]:starts[g + 1]], of stack entry stacks[g]."""
        pass_ = cls(torch.get_num_threads(), len(stacks), starts.data_ptr(), stacks.data_ptr(), order.data_ptr())
        pass_.held = (starts, stacks, order)
        return pass_


@cache
def kernels() -> Kernels | None:
    """The kernels, or None where they cannot be built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: the CPU's lean pass runs torch operations only")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except subprocess.CalledProcessError as error:
        log.warning("could not build the CPU kernels: the lean pass runs torch operations only\n%s", error.stderr)
        return None
    except OSError as error:
        log.warning("could not load the CPU kernels (%s): the lean pass runs torch operations only", error)
        return None
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    return Kernels(
        _function(library.lora_add, [pointer, pointer, pointer, count, pointer, count]),
        _function(library.rms_norm, [pointer, count, pointer, ctypes.c_float, count, count, pointer, count]),
    )


def _function(function: Any, arguments: list[type]) -> Any:
    function.argtypes, function.restype = arguments, None
    return function


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *FLAGS, *LIBRARIES, version, _cpu()]).encode()).hexdigest()[:16]
    library = cache_root() / "native" / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:  # built aside, then renamed: atomic
        built = Path(work) / library.name
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built), *LIBRARIES], capture_output=True, text=True, check=True
        )
        built.replace(library)
    log.info("built the CPU kernels: %s", library)
    return library


def _cpu() -> str:
    """The CPU's model and feature flags, where Linux says (the library is built for this CPU)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor()
    lines = cpuinfo.read_text().splitlines()
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))
