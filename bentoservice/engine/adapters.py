"""LoRA adapters over one base model: validate a PEFT folder, put it in a slot, pick slots per request.

Three tiers: `max_loras` fixed slots in the model's stacks (the device), up to `max_cpu_loras` read adapters in
host memory (pinned on CUDA, so a copy into a slot does not wait), and the rest on disk. A slot is rewritten in
place, so the stacks keep their shapes (and CUDA graphs their addresses) once they reach max_loras and the
largest rank. An adapter evicted from a slot goes to the host tier; the host tier's least recently used go.
Each read of an adapter has its own `uid`, which keys the prefix store's entries: they stay while that read is in a
slot or in host memory, and go (`forget`) when it leaves both or is replaced by another read.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from bentoservice.engine import metrics
from bentoservice.engine.errors import AdapterError, UnknownAdapter
from bentoservice.engine.lora import BatchedLoraLinear, LoraBatch

_UIDS = itertools.count(1)  # 0 is the bare base's
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class PreparedAdapter:
    """A validated adapter, read from disk, not yet in the model."""

    name: str
    source: str
    rank: int
    alpha: float
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    uid: int = field(default_factory=lambda: next(_UIDS))

    @property
    def target_modules(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.weights})


@dataclass
class LoadedAdapter:
    name: str
    source: str
    slot: int
    rank: int
    alpha: float
    target_modules: list[str]
    pinned: bool = False


class NoFreeSlot(AdapterError):
    """Every slot holds a pinned adapter or one that a request uses."""


class AdapterManager:
    """Owns the batched LoRA layers of one model. Mutations run on the engine thread only."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int = 0) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.batch = LoraBatch()
        self.loaded: dict[str, LoadedAdapter] = {}  # the device tier, in least recently used order
        self.host: collections.OrderedDict[str, PreparedAdapter] = collections.OrderedDict()
        self.default: str | None = None
        self._prepared: dict[str, PreparedAdapter] = {}  # the weights of each slot's adapter, to evict it to host
        self._layers: dict[str, BatchedLoraLinear] = {}
        self._pin = next(model.parameters()).device.type == "cuda"
        self.forget: Callable[[int], None] = lambda uid: None  # a read left every tier (its uid): the engine's hook

    # -- reading (any thread) -----------------------------------------------------------------

    def prepare(self, name: str, folder: Path, source: str | None = None) -> PreparedAdapter:
        config = self._read_config(folder)
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise AdapterError(f"{folder} has no adapter_model.safetensors")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(weights_file)).items():
            match = _KEY.match(key)
            if match is None:
                raise AdapterError(f"unsupported tensor {key!r} in the adapter (only LoRA A/B of Linear layers)")
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        if not pairs:
            raise AdapterError("the adapter holds no LoRA weights")
        rank = int(config["r"])
        if rank > self.max_rank:
            raise AdapterError(f"adapter rank {rank} exceeds max_lora_rank {self.max_rank}")
        weights = {path: self._check_pair(path, pair, rank) for path, pair in pairs.items()}
        if self._pin:
            weights = {path: (a.pin_memory(), b.pin_memory()) for path, (a, b) in weights.items()}
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return PreparedAdapter(name, source or str(folder), rank, alpha, scale, weights)

    @staticmethod
    def _read_config(folder: Path) -> dict:
        file = folder / "adapter_config.json"
        if not file.is_file():
            raise AdapterError(f"{folder} has no adapter_config.json")
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise AdapterError(f"peft_type {config.get('peft_type')!r} is not LORA")
        if config.get("use_dora"):
            raise AdapterError("DoRA adapters are not supported; merge the adapter instead")
        if config.get("modules_to_save"):
            raise AdapterError("adapters with modules_to_save are not supported; merge the adapter instead")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise AdapterError("adapters with per-layer rank_pattern/alpha_pattern are not supported")
        if not isinstance(config.get("r"), int) or config["r"] < 1:
            raise AdapterError("adapter_config.json has no valid rank r")
        return config

    def _check_pair(self, path: str, pair: dict[str, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path} lacks lora_{'B' if 'A' in pair else 'A'}")
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise AdapterError(
                f"the adapter targets {path}, which this base model lacks (an adapter for a different base model?)"
            ) from None
        if not isinstance(module, (nn.Linear, BatchedLoraLinear)):
            raise AdapterError(f"the adapter targets {path}, which is not a Linear layer here")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: LoRA rank {a.shape[0]} differs from the config's r={rank}")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise AdapterError(
                f"{path}: adapter shape {tuple(b.shape[:1]) + tuple(a.shape[1:])} does not fit "
                f"the base layer ({module.out_features}, {module.in_features}): "
                "an adapter for a different base model"
            )
        # On a GPU every row's update multiplies all slots' products by a 0/1 mask: one NaN there reaches every row.
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path}: the adapter's weights hold NaN or inf (a diverged fine-tune?)")
        return a, b

    # -- mutation (engine thread) -------------------------------------------------------------

    def install(
        self, adapter: PreparedAdapter, pinned: bool = False, in_use: Callable[[str], bool] = lambda name: False
    ) -> LoadedAdapter:
        """Put an adapter into a slot: a free one, else the least recently used whose adapter is neither pinned,
        the default nor `in_use` (that one moves to the host tier)."""
        if adapter.name in self.loaded:
            raise AdapterError(f"an adapter named {adapter.name!r} is already loaded")
        used = {a.slot for a in self.loaded.values()}
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        victim = None
        if free:
            slot = free[0]
        else:
            victim = next(
                (a for a in self.loaded.values() if not a.pinned and a.name != self.default and not in_use(a.name)),
                None,
            )
            if victim is None:
                raise NoFreeSlot(f"all {self.max_loras} adapter slots hold pinned adapters or adapters in use")
            slot = victim.slot
        self._replaced(self.host.pop(adapter.name, None), adapter)  # first, so that the victim cannot push it out
        if victim is not None:
            self._to_host(self._prepared.pop(victim.name), in_use)
            del self.loaded[victim.name]
            metrics.EVICTIONS.labels("gpu").inc()
        for path, (a, b) in adapter.weights.items():
            self._layer(path).set_slot(slot, a, b, adapter.scale)
        for path, layer in self._layers.items():
            layer.reserve(slot + 1)  # every stack to the shape the largest rank so far gave
            if path not in adapter.weights:
                layer.clear_slot(slot)
        self.batch.owners[slot] = adapter.uid
        loaded = LoadedAdapter(
            adapter.name, adapter.source, slot, adapter.rank, adapter.alpha, adapter.target_modules, pinned
        )
        self.loaded[adapter.name] = loaded
        self._prepared[adapter.name] = adapter
        return loaded

    def to_host(self, adapter: PreparedAdapter, in_use: Callable[[str], bool]) -> None:
        """Keep a read adapter in the host tier (or refresh it there), unless it is in a slot."""
        if adapter.name not in self.loaded:
            self._to_host(adapter, in_use)

    def _to_host(self, adapter: PreparedAdapter, in_use: Callable[[str], bool]) -> None:
        """Past max_cpu_loras the least recently used go back to disk, but not one that a request waits for."""
        self._replaced(self.host.get(adapter.name), adapter)
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        excess = len(self.host) - self.max_cpu_loras
        for name in [name for name in self.host if not in_use(name)][: max(excess, 0)]:
            self.forget(self.host.pop(name).uid)
            metrics.EVICTIONS.labels("cpu").inc()

    def _replaced(self, old: PreparedAdapter | None, new: PreparedAdapter) -> None:
        if old is not None and old is not new:
            self.forget(old.uid)

    def touch(self, name: str) -> int:
        """The slot of a loaded adapter, marked as just used."""
        adapter = self.loaded.pop(name)
        self.loaded[name] = adapter
        return adapter.slot

    def tier(self, name: str) -> str:
        return "gpu" if name in self.loaded else "cpu" if name in self.host else "disk"

    def unload(self, name: str) -> int | None:
        """Forget an adapter in any tier; returns the slot it held."""
        hosted = self.host.pop(name, None)
        adapter = self.loaded.pop(name, None)
        for read in (hosted, self._prepared.pop(name, None)):
            if read is not None:
                self.forget(read.uid)
        if adapter is None:
            if hosted is None:
                raise UnknownAdapter(name)
            return None
        self.batch.owners.pop(adapter.slot, None)
        for layer in self._layers.values():
            layer.clear_slot(adapter.slot)
        if self.default == name:
            self.default = None
        return adapter.slot

    def _layer(self, path: str) -> BatchedLoraLinear:
        if path not in self._layers:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            wrapped = BatchedLoraLinear(getattr(parent, child), self.batch)
            setattr(parent, child, wrapped)
            self._layers[path] = wrapped
            wrapped.reserve(1 + max((a.slot for a in self.loaded.values()), default=0))
        return self._layers[path]

    # -- selection ----------------------------------------------------------------------------

    def set_default(self, name: str | None) -> None:
        if name is not None and name not in self.loaded:
            raise UnknownAdapter(name)
        self.default = name

    def slot(self, name: str | None) -> int:
        if name is None:
            return 0
        adapter = self.loaded.get(name)
        if adapter is None:
            raise UnknownAdapter(name)
        return adapter.slot
