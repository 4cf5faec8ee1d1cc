"""OpenAI request bodies → `GenerateRequest`: what `/v1/chat/completions` and `/v1/completions` take.

Parameters follow the OpenAI API, with the peers' extensions a client sends in `extra_body`: `top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, a per-request `mix` of adapters, LoRAX's `adapter_id`,
and `regex` / `grammar` output constraints. What the API has but this server does not do (tools,
`echo`, `suffix`, `best_of` > 1) is refused by name rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from openlora.adapters import adapter_ref
from openlora.request import STRATEGIES
from openlora.v1 import common_pb2, inference_pb2
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import InvalidArgument

MAX_COMPLETION_LOGPROBS = 20


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: SDKs add new ones every release.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class MixComponent(_Body):
    id: str
    weight: float


class Mix(_Body):
    components: list[MixComponent]
    strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = 0.0
    rank: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)


class _Generation(_Body):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # Extensions (extra_body), as vLLM, SGLang and LoRAX take them.
    top_k: int = 0
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    ignore_eos: bool = False
    adapter_id: str | None = None
    mix: Mix | None = None
    regex: str | None = None
    grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # the legacy API's default
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def chat_request(body: ChatCompletionRequest, base_model: str) -> inference_pb2.GenerateRequest:
    if body.tools:
        raise InvalidArgument("tools", "tool calling is not supported by this server")
    request = _common(body, base_model, body.max_completion_tokens or body.max_tokens)
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        request.messages.messages.add(role=message.role, content=content or "")
        if not message.role:
            raise InvalidArgument(f"messages[{i}].role", "must not be empty")
    if body.top_logprobs and not body.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    request.return_logprobs = body.logprobs
    request.top_logprobs = body.top_logprobs or 0
    return request


def completion_request(body: CompletionRequest, base_model: str) -> inference_pb2.GenerateRequest:
    if body.echo:
        raise InvalidArgument("echo", "echoing the prompt is not supported by this server")
    if body.suffix:
        raise InvalidArgument("suffix", "suffixes (fill in the middle) are not supported by this server")
    if body.best_of not in (None, 1):
        raise InvalidArgument("best_of", "only 1 is supported")
    request = _common(body, base_model, body.max_tokens)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidArgument("prompt", "one prompt per request (send several requests)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        request.text = prompt
    else:
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        request.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    if body.logprobs is not None:
        request.return_logprobs = True
        request.top_logprobs = body.logprobs
    return request


def _common(body: _Generation, base_model: str, max_tokens: int | None) -> inference_pb2.GenerateRequest:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    request = inference_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed or 0,
            max_new_tokens=max_tokens or 0,
            stop=stop,
            ignore_eos=body.ignore_eos,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            repetition_penalty=body.repetition_penalty,
            min_p=body.min_p,
            logit_bias=_logit_bias(body.logit_bias),
            n=body.n,
        )
    )
    if body.seed is not None and body.seed < 0:
        raise InvalidArgument("seed", "must be >= 0")
    _adapter(request, body, base_model)
    _response_format(request, body)
    return request


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for token, value in (bias or {}).items():
        if not token.isdigit():
            raise InvalidArgument(f"logit_bias[{token}]", "keys must be token ids")
        out[int(token)] = value
    return out


def _adapter(request: inference_pb2.GenerateRequest, body: _Generation, base_model: str) -> None:
    """`model` (or LoRAX's `adapter_id`) names the base model or an adapter; `mix` merges several."""
    if body.mix is not None:
        if body.adapter_id:
            raise InvalidArgument("mix", "give either adapter_id or mix, not both")
        if not body.mix.components:
            raise InvalidArgument("mix.components", "a mix needs at least one component")
        request.mix.strategy = STRATEGIES[body.mix.strategy]
        request.mix.density = body.mix.density
        request.mix.rank = body.mix.rank
        request.mix.seed = body.mix.seed
        for component in body.mix.components:
            request.mix.components.add(adapter=adapter_ref(component.id), weight=component.weight)
        return
    name = body.adapter_id or body.model
    if not name or name == base_model:
        return
    request.adapter_ref.CopyFrom(adapter_ref(name))


def _response_format(request: inference_pb2.GenerateRequest, body: _Generation) -> None:
    formats = [
        name
        for name, given in (
            ("response_format", body.response_format and body.response_format.type != "text"),
            ("regex", body.regex),
            ("grammar", body.grammar),
        )
        if given
    ]
    if len(formats) > 1:
        raise InvalidArgument(formats[1], f"give one output constraint, not {' and '.join(formats)}")
    if body.regex:
        request.response_format.regex = body.regex
    elif body.grammar:
        request.response_format.grammar = body.grammar
    elif body.response_format is not None and body.response_format.type == "json_object":
        request.response_format.json_object = True
    elif body.response_format is not None and body.response_format.type == "json_schema":
        given = body.response_format.json_schema
        if given is None or given.schema_ is None:
            raise InvalidArgument("response_format.json_schema.schema", "a JSON schema is required")
        request.response_format.json_schema = json.dumps(given.schema_)
