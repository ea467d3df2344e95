"""Chat templates: the tokenizer's own by default, named ones shipped, and a runtime registry.

Like FastChat's `register_conv_template(template, override=True)`, a user may register a new template
or replace a shipped one while the server runs.
"""

from __future__ import annotations

import threading
import time

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_CHARS = 64 * 1024
MAX_RENDER_CHARS = 256 * 1024
MAX_RENDER_SECONDS = 2.0
# The conversation a template is tried on before it is accepted.
_SAMPLE = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye!"},
]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

_SHIPPED: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # FastChat's vicuna_v1.1: SeparatorStyle.ADD_COLON_TWO with sep " " and sep2 "</s>".
    "vicuna_v1.1": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        '{% set messages = messages[1:] %}{% else %}{% set system = "' + VICUNA_SYSTEM + '" %}{% endif %}'
        "{{ system + ' ' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '<s>[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' </s>' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        '{% set messages = messages[1:] %}{% else %}{{ "' + ALPACA_SYSTEM + '\n\n" }}{% endif %}'
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

_registry: dict[str, str] = dict(_SHIPPED)
_lock = threading.Lock()


class TemplateError(ValueError):
    pass


class TemplateExists(TemplateError):
    """The name is taken and the request did not ask to replace it (a 409)."""


def register_chat_template(name: str, template: str, override: bool = False) -> None:
    """Add a named Jinja chat template; replacing an existing name needs override=True."""
    check_template(template)
    with _lock:
        if name in _registry and not override:
            raise TemplateExists(f"chat template {name!r} exists; pass override=True to replace it")
        _registry[name] = template


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _sandbox() -> ImmutableSandboxedEnvironment:
    """As transformers renders chat templates: sandboxed (no attribute of Python internals, nothing mutable)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    return env


def check_template(template: str) -> None:
    """Parse the template and render a sample chat with it in the sandbox, within a size, an output length and a
    time limit; a template that reaches for Python internals (cycler.__init__.__globals__ ...) fails here."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the chat template has {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    try:
        compiled = _sandbox().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not parse: {exc.message} (line {exc.lineno})") from None
    length, deadline = 0, time.monotonic() + MAX_RENDER_SECONDS
    try:
        for part in compiled.generate(messages=_SAMPLE, add_generation_prompt=True, bos_token="", eos_token=""):
            length += len(part)
            if length > MAX_RENDER_CHARS or time.monotonic() > deadline:
                raise TemplateError(
                    f"the chat template renders more than {MAX_RENDER_CHARS} characters or takes "
                    f"over {MAX_RENDER_SECONDS} s for a four-message chat"
                )
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"the chat template is refused: {exc}") from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"the chat template fails on a sample chat: {exc}") from None


def renders_tools(template: str) -> bool:
    """Whether a chat template reads `tools` itself (as Qwen2.5's and Llama 3.1's do), so a chat's tools and calls
    go to it as they are; otherwise the model card's tool format writes them into plain messages."""
    return "tools" in meta.find_undeclared_variables(_sandbox().parse(template))


def chat_templates() -> dict[str, str]:
    with _lock:
        return dict(_registry)


def resolve_template(choice: str | None, tokenizer_template: str | None) -> tuple[str, str]:
    """(name, jinja) for a choice that is a registered name, a Jinja string, or None (the tokenizer's)."""
    if choice is None:
        if tokenizer_template:
            return "tokenizer", tokenizer_template
        choice = "chatml"
    with _lock:
        if choice in _registry:
            return choice, _registry[choice]
    if "{%" in choice or "{{" in choice:
        return "custom", choice
    raise TemplateError(f"unknown chat template {choice!r}; known: {', '.join(sorted(_registry))}")
