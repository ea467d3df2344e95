"""One served base model: its engine, tokenizer, chat template, names and adapters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bentoservice import store
from bentoservice.config import Settings
from bentoservice.engine.adapters import LoadedAdapter
from bentoservice.engine.errors import AdapterError, ContextOverflow, UnknownModel
from bentoservice.engine.params import SamplingParams
from bentoservice.engine.scheduler import Engine, Stream
from bentoservice.engine.templates import TemplateError, resolve_template

log = logging.getLogger(__name__)

BASE_SUFFIX = ":base"
"""`<model>:base` names the bare base model, whatever the default adapter is."""


@dataclass(frozen=True)
class Choice:
    """What a request's `model` field selects: an adapter, or None for the bare base."""

    adapter: str | None


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
    def __init__(self, name: str, model_id: str, path: Path, settings: Settings,
                 card_template: str | None = None) -> None:
        self.name, self.model_id = name, model_id
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        log.info("loading %s from %s on %s (%s)", name, path, device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.to(device).eval()
        self.template_choice = settings.chat_template or card_template
        resolve_template(self.template_choice, self.tokenizer.chat_template)  # fail at start, not per request
        self.default_max_tokens = settings.default_max_tokens
        self.max_choices = min(settings.max_choices, settings.max_running)
        self.vocab_size = int(model.config.vocab_size)
        self.engine = Engine(model, self.tokenizer, max_running=settings.max_running,
                             max_queued=settings.max_queued, prefill_token_budget=settings.prefill_token_budget,
                             max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                             prefix_cache_bytes=prefix_cache_mb(settings, device) * 2**20)

    # -- names --------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        return dict(self.engine.adapters.loaded)

    @property
    def default_adapter(self) -> str | None:
        return self.engine.adapters.default

    def choose(self, model: str) -> Choice:
        """Resolve a request's `model`: an adapter name, the base (default adapter), or `<base>:base`."""
        if model in (self.name, self.model_id):
            return Choice(self.default_adapter)
        if model in (self.name + BASE_SUFFIX, self.model_id + BASE_SUFFIX):
            return Choice(None)
        if model in self.engine.adapters.loaded:
            return Choice(model)
        raise UnknownModel(model)

    # -- prompts ------------------------------------------------------------------------------

    @property
    def template_name(self) -> str:
        return resolve_template(self.template_choice, self.tokenizer.chat_template)[0]

    @property
    def template(self) -> str:
        """Looked up on each use, so a template re-registered at runtime takes effect at once."""
        return resolve_template(self.template_choice, self.tokenizer.chat_template)[1]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        except jinja2.TemplateError as exc:  # the template itself raised (e.g. on a role order it refuses)
            raise TemplateError(f"the chat template {self.template_name!r} failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """The completion budget; a request that cannot fit the context is refused with the numbers."""
        limit = self.engine.max_length
        room = limit - prompt_tokens
        if requested is None:
            if room < 1:
                raise ContextOverflow(f"this model's maximum context length is {limit} tokens, "
                                      f"but the prompt has {prompt_tokens} tokens")
            return min(room, self.default_max_tokens)
        if prompt_tokens + requested > limit:
            raise ContextOverflow(f"this model's maximum context length is {limit} tokens; you requested "
                                  f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                                  f"{requested} for the completion)")
        return requested

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

    def load_adapter(self, name: str, folder: Path, source: str | None = None) -> LoadedAdapter:
        """Validate on the calling thread, install on the engine thread; all or nothing."""
        if name in (self.name, self.model_id) or name.endswith(BASE_SUFFIX):
            raise AdapterError(f"{name!r} names the base model; choose another adapter name")
        prepared = self.engine.adapters.prepare(name, folder, source)
        return self.engine.call(lambda: self.engine.adapters.install(prepared)).result()

    def load_adapter_from(self, src: str, name: str | None = None, confined: bool = False) -> LoadedAdapter:
        """Load an adapter given as a folder, a store tag or a hub id (see store.adapter_source)."""
        try:
            source = store.adapter_source(src, confined)
        except store.StoreError as exc:
            raise AdapterError(str(exc)) from None
        if source.base is not None and source.base != self.name:
            raise AdapterError(f"the adapter {src!r} was made for the base model {source.base!r}, "
                               f"not {self.name!r}")
        return self.load_adapter(name or source.name, source.folder, src)

    def unload_adapter(self, name: str) -> None:
        self.engine.call(lambda: self.engine.adapters.unload(name)).result()

    def set_default_adapter(self, name: str | None) -> None:
        self.engine.call(lambda: self.engine.adapters.set_default(name)).result()

    def close(self) -> None:
        self.engine.stop()

