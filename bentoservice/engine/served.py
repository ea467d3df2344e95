"""One served base model: its engine, tokenizer, chat template, names and adapters."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bentoservice import store
from bentoservice.config import Settings
from bentoservice.engine import tool_parsers
from bentoservice.engine.adapters import LoadedAdapter, NoFreeSlot, PreparedAdapter
from bentoservice.engine.errors import AdapterError, ContextOverflow, UnknownAdapter, UnknownModel
from bentoservice.engine.params import Grammar, SamplingParams
from bentoservice.engine.scheduler import Engine, Stream
from bentoservice.engine.templates import TemplateError, renders_tools, resolve_template, time_limited

log = logging.getLogger(__name__)

BASE_SUFFIX = ":base"
"""`<model>:base` names the bare base model, whatever the default adapter is."""


@dataclass(frozen=True)
class Choice:
    """What a request's `model` field selects: an adapter, or None for the bare base."""

    adapter: str | None


@dataclass(frozen=True)
class Servable:
    """An adapter this service can serve: where it is now (`gpu`: a slot, `cpu`: host memory, `disk`) and whence."""

    name: str
    tier: str
    source: str
    loaded: LoadedAdapter | None = None


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prefix_cache_mb(settings: Settings, device: torch.device) -> int:
    if settings.prefix_cache_mb is not None:
        return settings.prefix_cache_mb
    return 0 if device.type == "cuda" else 128


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ServedModel:
    def __init__(
        self,
        name: str,
        model_id: str,
        path: Path,
        settings: Settings,
        card_template: str | None = None,
        tool_format: str | None = tool_parsers.DEFAULT,
    ) -> None:
        self.name, self.model_id = name, model_id
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        log.info("loading %s from %s on %s (%s)", name, path, device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
        self.template_choice = settings.chat_template or card_template
        resolve_template(self.template_choice, self.tokenizer.chat_template)  # fail at start, not per request
        self.tool_format = tool_parsers.tool_format(tool_format) if tool_format else None
        self.default_max_tokens = settings.default_max_tokens
        self.vocab_size = int(model.config.vocab_size)
        self.catalog: dict[str, str] = {}  # served adapter name -> the folder, store tag or URL it is read from
        self._lookups = threading.Lock()  # one lookup of a new name at a time: concurrent first requests find it once
        self.engine = Engine(
            model,
            self.tokenizer,
            max_running=settings.max_running,
            max_queued=settings.max_queued,
            prefill_token_budget=settings.prefill_token_budget,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            prefix_cache_bytes=prefix_cache_mb(settings, device) * 2**20,
            max_cpu_loras=settings.max_cpu_loras,
            adapter_wait_s=settings.adapter_wait_s,
            read_adapter=self._read_adapter,
        )

    # -- names --------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        return dict(self.engine.adapters.loaded)

    @property
    def default_adapter(self) -> str | None:
        return self.engine.adapters.default

    def knows(self, model: str) -> bool:
        """Whether `choose` answers without a lookup (the base, or an adapter name seen before)."""
        return (
            model in self.catalog
            or model in self.engine.adapters.loaded
            or model in (self.name, self.model_id, self.name + BASE_SUFFIX, self.model_id + BASE_SUFFIX)
        )

    def choose(self, model: str) -> Choice:
        """Resolve a request's `model`: the base (default adapter), `<base>:base`, or an adapter by any name that
        store.adapter_source accepts but a path; one not loaded yet is loaded when the request is admitted."""
        if model in (self.name, self.model_id):
            return Choice(self.default_adapter)
        if model in (self.name + BASE_SUFFIX, self.model_id + BASE_SUFFIX):
            return Choice(None)
        if model in self.catalog or model in self.engine.adapters.loaded:
            return Choice(model)
        try:
            return Choice(self.find(model, paths=False))
        except UnknownAdapter:
            raise UnknownModel(model) from None

    def find(self, ref: str, paths: bool = True, name: str | None = None) -> str:
        """The served name of the adapter `ref` names (see store.adapter_source; paths only inside the allowed
        folders, no hub ids), added to the catalog under `name` (default: `ref` itself, a store tag's name)."""
        with self._lookups:
            try:
                source = store.adapter_source(ref, confined=True, known=self.catalog, paths=paths, hub=False)
            except store.AdapterNotFound as exc:
                raise UnknownAdapter(str(exc)) from None
            except store.StoreError as exc:
                raise AdapterError(str(exc)) from None
            self._check_base(ref, source)
            for served, where in self.catalog.items():  # the store tag or folder of an adapter already served
                if where in (ref, str(source.folder)):
                    return served
            key = name or ref
            self.catalog.setdefault(key, str(source.folder))
            return key

    # -- prompts ------------------------------------------------------------------------------

    @property
    def template_name(self) -> str:
        return resolve_template(self.template_choice, self.tokenizer.chat_template)[0]

    @property
    def template(self) -> str:
        """Looked up on each use, so a template re-registered at runtime takes effect at once."""
        return resolve_template(self.template_choice, self.tokenizer.chat_template)[1]

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt; a chat with tools or calls needs a `tool_format` (the API refuses them without one)."""
        template = self.template
        if self.tool_format and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
            messages, tools = self.tool_format.chat(messages, tools, renders_tools(template))
        try:
            with time_limited():  # a registered template may loop longer on a real chat than on the check's
                return self.tokenizer.apply_chat_template(
                    messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
                )
        except jinja2.TemplateError as exc:  # the template itself raised (e.g. on a role order it refuses)
            raise TemplateError(f"the chat template {self.template_name!r} failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenizer(self.render_chat(messages, tools), add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The completion budget; a request that cannot fit the context is refused with the numbers."""
        limit = self.engine.max_length
        room = limit - prompt_tokens
        if requested is None:
            if room < 1:
                raise ContextOverflow(
                    f"this model's maximum context length is {limit} tokens, but the prompt has {prompt_tokens} tokens"
                )
            return min(room, self.default_max_tokens)
        if prompt_tokens + requested > limit:
            raise ContextOverflow(
                f"this model's maximum context length is {limit} tokens; you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                f"{requested} for the completion)"
            )
        return requested

    def check_grammar(self, grammar: Grammar) -> None:
        """Compile a grammar for this tokenizer (cached; a GrammarError if it cannot be compiled), off the event loop:
        a request under it is then queued without compiling on the engine thread."""
        self.engine.grammars.compile(grammar)

    def generate(self, prompt: list[int], params: SamplingParams, choice: Choice) -> Stream:
        return self.engine.submit(prompt, params, choice.adapter)

    def generate_choices(self, prompt: list[int], params: list[SamplingParams], choice: Choice) -> list[Stream]:
        """One stream per entry of `params`: completions of the same prompt, which share its prefill."""
        return self.engine.submit_choices(prompt, params, choice.adapter)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- adapters -----------------------------------------------------------------------------

    def _check_base(self, ref: str, source: store.AdapterSource) -> None:
        if source.base is not None and source.base != self.name:
            raise AdapterError(f"the adapter {ref!r} was made for the base model {source.base!r}, not {self.name!r}")

    def _read_adapter(self, name: str) -> PreparedAdapter:
        """An adapter of the catalog read from disk (any thread but the engine's)."""
        where = self.catalog.get(name)
        if where is None:
            raise UnknownAdapter(name)
        return self.engine.adapters.prepare(name, store.catalogued_folder(where), where)

    def register(self, name: str, src: str) -> None:
        """Serve an adapter on request under `name` (e.g. a finished job's fine_tuned_model) without loading it."""
        self.catalog[name] = src

    def load_adapter(self, name: str, folder: Path, source: str | None = None, pinned: bool = False) -> str:
        """Validate on the calling thread, install on the engine thread; all or nothing. With every slot busy, an
        adapter that is not pinned waits in the host tier for its first request."""
        if name in (self.name, self.model_id) or name.endswith(BASE_SUFFIX):
            raise AdapterError(f"{name!r} names the base model; choose another adapter name")
        if name in self.engine.adapters.loaded:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        prepared = self.engine.adapters.prepare(name, folder, source)
        self.engine.call(lambda: self._install(prepared, pinned)).result()
        self.catalog[name] = str(folder)
        return name

    def _install(self, prepared: PreparedAdapter, pinned: bool) -> None:
        """On the engine thread."""
        adapters = self.engine.adapters
        try:
            adapters.install(prepared, pinned, self.engine.busy().__contains__)
        except NoFreeSlot:
            if pinned:
                raise
            adapters.to_host(prepared, self.engine.busy().__contains__)

    def load_adapter_from(self, src: str, name: str | None = None, confined: bool = False, pinned: bool = False) -> str:
        """Load an adapter given as a folder, a store tag, a served name or a hub id (see store.adapter_source)."""
        try:
            source = store.adapter_source(src, confined, self.catalog)
        except store.AdapterNotFound as exc:
            raise UnknownAdapter(str(exc)) from None
        except store.StoreError as exc:
            raise AdapterError(str(exc)) from None
        self._check_base(src, source)
        return self.load_adapter(name or source.name, source.folder, src, pinned)

    def served_name(self, ref: str) -> str:
        """The name an adapter is served under, given that name, its store tag or its folder."""
        if ref in self.catalog or ref in self.engine.adapters.loaded:
            return ref
        return self.find(ref)

    def unload_adapter(self, ref: str) -> None:
        name = self.served_name(ref)
        self.catalog.pop(name, None)
        try:
            self.engine.call(lambda: self.engine.adapters.unload(name)).result()
        except UnknownAdapter:
            pass  # it was only on disk

    def set_default_adapter(self, ref: str | None) -> None:
        """The adapter that requests naming the base model use, put into a slot and kept there."""
        if ref is None:
            self.engine.call(lambda: self.engine.adapters.set_default(None)).result()
            return
        name = self.served_name(ref)
        adapters = self.engine.adapters
        prepared = None if name in adapters.loaded or name in adapters.host else self._read_adapter(name)

        def switch() -> None:
            if name not in adapters.loaded:
                adapters.install(prepared or adapters.host[name], in_use=self.engine.busy().__contains__)
            adapters.set_default(name)

        self.engine.call(switch).result()

    def servable(self) -> list[Servable]:
        """Every adapter this service can serve: in a slot, in host memory, or on disk (the catalog, the store,
        the adapter folders and the adapter source URL)."""
        adapters = self.engine.adapters
        loaded, host = dict(adapters.loaded), list(adapters.host)
        found = {name: Servable(name, "gpu", a.source, a) for name, a in sorted(loaded.items())}
        for name, where in sorted(self.catalog.items()):
            found.setdefault(name, Servable(name, "cpu" if name in host else "disk", where))
        served_from = set(self.catalog.values())
        for name, where in store.servable_adapters(self.name).items():
            if where not in served_from:
                found.setdefault(name, Servable(name, "disk", where))
        return list(found.values())

    def close(self) -> None:
        self.engine.stop()
