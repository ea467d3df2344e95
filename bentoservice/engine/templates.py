"""Chat templates: the tokenizer's own by default, named ones shipped, and a runtime registry.

Like FastChat's `register_conv_template(template, override=True)`, a user may register a new template
or replace a shipped one while the server runs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

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


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, and no `*` or `**` whose result alone would pass the output limit ('x' * 10**10 is
    one C call: no time limit could stop it before it has taken the memory)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sized = [x for x in (left, right) if isinstance(x, str | list | tuple)]
            times = [x for x in (left, right) if isinstance(x, int)]
            if sized and times and len(sized[0]) * times[0] > MAX_RENDER_CHARS:
                raise SecurityError(f"a product of over {MAX_RENDER_CHARS} items")
        elif operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise SecurityError("a power over 64")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _sandbox() -> ImmutableSandboxedEnvironment:
    """As transformers renders chat templates: sandboxed (no attribute of Python internals, nothing mutable)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    return env


class TemplateTimeout(TemplateError):
    pass


_JINJA = str(Path(jinja2.__file__).parent)


@contextmanager
def time_limited(seconds: float = MAX_RENDER_SECONDS) -> Iterator[None]:
    """Stop a template that renders for longer than `seconds`, in this thread: a loop that writes nothing never
    hands control back to check the time, so a trace function checks it on each line of a compiled template's code
    and of jinja2's own (its filters, `lipsum`); other code runs untraced. About 0.3 ms more on a 1 ms render."""
    end = time.monotonic() + seconds

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > end:
            raise TemplateTimeout(f"the chat template takes over {seconds} s to render")
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        return on_line if name == "<template>" or name.startswith(_JINJA) else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def check_template(template: str) -> None:
    """Parse the template and render a sample chat with it in the sandbox, within a size, an output length and a
    time limit; a template that reaches for Python internals (cycler.__init__.__globals__ ...) fails here."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the chat template has {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    try:
        compiled = _sandbox().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not parse: {exc.message} (line {exc.lineno})") from None
    length = 0
    try:
        with time_limited():
            for part in compiled.generate(messages=_SAMPLE, add_generation_prompt=True, bos_token="", eos_token=""):
                length += len(part)
                if length > MAX_RENDER_CHARS:
                    raise TemplateError(
                        f"the chat template renders more than {MAX_RENDER_CHARS} characters for a four-message chat"
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
