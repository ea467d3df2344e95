"""Request bodies of the OpenAI-compatible routes (responses follow OpenAI's shapes as plain dicts).

No field is silently ignored. A body field is one of: implemented; harmless metadata that changes nothing
here (`METADATA`, kept as declared fields so a typo is still refused); an OpenAI feature this server does
not have, refused with a 400 whose `param` names it unless its value asks for nothing (`REFUSED`); or a
vLLM extra that is implemented (`repetition_penalty`, `min_tokens`, `stop_token_ids`, `ignore_eos`, and the
structured outputs' `structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`).
Anything else is a 400 naming the field (`extra="forbid"`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from bentoservice.api.completions.tools import Tool, ToolCall, ToolChoice
from bentoservice.config import get_settings


def _encodable(text: str) -> str:
    """A lone surrogate ("\\ud800" in JSON) is valid JSON but no text a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate, which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
# torch.Generator.manual_seed takes a signed or unsigned 64-bit integer.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
# The settings' bounds, read once: pydantic enforces them and the OpenAPI document states them as maximum/minimum.
_settings = get_settings()
OutputTokens = Annotated[int, Field(ge=1, le=_settings.max_output_tokens)]
Choices = Annotated[int, Field(ge=1, le=_settings.choices_limit)]

METADATA = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
)
"""Accepted and not acted on: they label a request for OpenAI's own storage, billing and caching."""

HARMLESS: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "functions": ([],),
    "suffix": ("",),
    "best_of": (1,),
}
"""Values of refused fields that ask for nothing beyond what the server does."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value not in HARMLESS.get(info.field_name or "", ()):
        raise ValueError(f"`{info.field_name}` is not supported by this server")
    return value


Refused = Annotated[Any, AfterValidator(_refuse)]
"""An OpenAI field this server does not implement: a 400 naming it unless its value asks for nothing."""

CHAT_REFUSED = (
    "audio",
    "modalities",
    "functions",
    "function_call",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "moderation",
    "prompt_cache_options",
)
TEXT_REFUSED = ("best_of", "suffix")


def _refusing(name: str, base: type[BaseModel], refused: tuple[str, ...]) -> Any:
    """`base` with a `Refused` field for each of `refused`."""
    fields: dict[str, Any] = {field: (Refused, None) for field in refused}
    return create_model(name, __base__=base, __module__=__name__, **fields)


def _given_only_if(other: str, wanted: bool, message: str) -> Callable[[Any, ValidationInfo], Any]:
    """A check that a field is set only when the field `other` (declared before it) is `wanted`."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if value is not None and bool(info.data.get(other)) != wanted:
            raise ValueError(message)
        return value

    return check


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant's calls (its content may then be null)."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""
    # An assistant message sent back as the SDK dumped it carries these, empty.
    refusal: str | None = None
    function_call: Refused = None
    audio: Refused = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has `tool_calls`")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message, and only a tool message, has `tool_call_id`")
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs `content`")
        return self

    def plain(self) -> dict[str, Any]:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        plain: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            plain["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            plain["tool_call_id"] = self.tool_call_id
        return plain


class JsonSchema(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """None: any JSON object."""
    strict: bool | None = None
    """True: no properties beyond those the schema names, unless it allows them (OpenAI's default is False)."""


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_iff_asked(self) -> ResponseFormat:
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("`json_schema` comes with, and only with, type json_schema")
        return self


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[Text] | None = Field(None, min_length=1)
    grammar: str | None = None
    """EBNF (GBNF), root rule `root`."""
    json_object: bool | None = None
    structural_tag: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """OpenAI pads chunks against side channels; these are plain chunks (harmless either way)."""


class SamplingFields(Strict):
    """Fields common to chat and text completions."""

    model: str
    adapter_id: str | None = Field(None, min_length=1)
    """LoRAX's per-request adapter: any name `model` accepts for an adapter; `model` then names the base."""
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: OutputTokens | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    user: str | None = None
    # vLLM's extras.
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Structured outputs (api/completions/structured.py): OpenAI's, then vLLM's extras; at most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        if bias and any(not -100 <= b <= 100 for b in bias.values()):
            raise ValueError("logit_bias values lie in -100..100")
        return bias

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _Chat(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: OutputTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = None
    """None: "auto" with tools, "none" without (api/completions/tools.py checks that they fit)."""
    parallel_tool_calls: bool | None = None
    """False: at most one call; only means something with `tools`, as in OpenAI's API."""
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    _needs_logprobs = field_validator("top_logprobs")(
        _given_only_if("logprobs", True, "top_logprobs needs logprobs: true")
    )

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class _Text(SamplingFields):
    prompt: Text | list[Text] | list[Annotated[int, Field(ge=0)]]
    max_tokens: OutputTokens | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(prompt, list) and (not prompt or (isinstance(prompt[0], str) and len(prompt) != 1)):
            raise ValueError("give one prompt: a string, a list of one string, or a list of token ids")
        if prompt in ("", [""]):
            raise ValueError("the prompt is empty")
        return prompt

    _not_with_echo = field_validator("logprobs")(
        _given_only_if("echo", False, "logprobs with echo (the prompt's log-probabilities) is not supported")
    )

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs


ChatCompletionRequest = _refusing("ChatCompletionRequest", _Chat, CHAT_REFUSED)
CompletionRequest = _refusing("CompletionRequest", _Text, TEXT_REFUSED)


class TemplateRegistration(BaseModel):
    name: str = Field(min_length=1)
    template: str = Field(min_length=1)
    override: StrictBool = False


class TemplateQuery(BaseModel):
    model: str | None = None
