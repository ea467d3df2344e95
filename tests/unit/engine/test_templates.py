"""Chat templates: resolving a choice, rendering the shipped ones, the runtime registry's rules."""

from __future__ import annotations

import sys

import jinja2
import pytest

from bentoservice.engine.templates import (
    VICUNA_SYSTEM,
    TemplateError,
    TemplateExists,
    chat_templates,
    check_template,
    register_chat_template,
    resolve_template,
)

MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def render(template: str, messages: list[dict[str, str]] = MESSAGES) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)


def test_the_tokenizers_template_by_default_else_chatml() -> None:
    assert resolve_template(None, "{{ 'x' }}") == ("tokenizer", "{{ 'x' }}")
    name, template = resolve_template(None, None)
    assert name == "chatml"
    assert render(template) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_vicuna_renders_fastchats_separators_and_default_system() -> None:
    _, template = resolve_template("vicuna_v1.1", None)
    assert render(template) == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello</s>USER: Bye ASSISTANT:"
    system = [{"role": "system", "content": "Be brief."}, *MESSAGES[:1]]
    assert render(template, system) == "Be brief. USER: Hi ASSISTANT:"


def test_an_inline_jinja_choice_is_custom_and_an_unknown_name_is_refused() -> None:
    assert resolve_template("{% for m in messages %}{{ m['content'] }}{% endfor %}", None)[0] == "custom"
    with pytest.raises(TemplateError, match="unknown chat template 'nope'"):
        resolve_template("nope", None)


def test_the_registry_refuses_bad_templates_and_silent_overrides() -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        register_chat_template("unit-broken", "{% for m in messages %}")
    register_chat_template("unit-echo", "{{ messages[0]['content'] }}")
    assert chat_templates()["unit-echo"] == "{{ messages[0]['content'] }}"
    with pytest.raises(TemplateExists, match="override=True"):
        register_chat_template("unit-echo", "{{ 'other' }}")
    register_chat_template("unit-echo", "{{ 'other' }}", override=True)
    assert render(resolve_template("unit-echo", None)[1]) == "other"


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ('{{ cycler.__init__.__globals__.os.popen("id").read() }}', "refused"),
        ("{{ messages.append(1) }}", "refused"),
        ("x" * 70_000, "characters; the limit"),
        ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "renders more than"),
        ("{{ 'x' * 10000000000 }}", "product of over"),
        ("{{ [1] * 10000000000 }}", "product of over"),
        ("{{ 2 ** 100000 }}", "power over 64"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "takes over 2.0 s"),
        ("{{ lipsum(n=10000000) | length }}", "takes over 2.0 s"),  # jinja2's own code is timed too
    ],
)
def test_templates_are_tried_in_a_sandbox_with_limits(template: str, why: str) -> None:
    before = sys.gettrace()
    with pytest.raises(TemplateError, match=why):
        check_template(template)
    assert sys.gettrace() is before  # the time limit's trace function is gone again
