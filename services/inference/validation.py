"""`GenerateRequest` → a checked domain request, or `InvalidArgument` naming the first bad field.

Pure: no engine, no gRPC, no I/O, so every refusal is unit-tested directly. What only the engine or
the adapter cache can know (an unknown adapter, a rank over the slots' maximum) is checked later by
the service; everything a request says about itself is checked here.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass

from openlora.v1 import common_pb2, inference_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.request_checks import check_generate_request, check_mix_components, check_tenant
from services.common.trust.roles import Role
from services.inference.adapter_cache.key import AdapterKey
from services.inference.adapter_cache.mixing import MixSpec
from services.inference.engine.constraints import check_constraint
from services.inference.engine.lora.mixes import Strategy
from services.inference.engine.output_format import Constraint
from services.inference.engine.sequence import SamplingParams
from services.inference.prompts import ChatTurn, Prompter

STRATEGIES: dict[int, Strategy] = {
    common_pb2.LINEAR: "LINEAR",
    common_pb2.TIES: "TIES",
    common_pb2.DARE_LINEAR: "DARE_LINEAR",
    common_pb2.DARE_TIES: "DARE_TIES",
}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_SAMPLES = 16
MAX_CONSTRAINT_CHARS = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """What this worker accepts for one request."""

    max_context: int  # prompt + generated tokens
    default_max_new_tokens: int
    max_new_tokens_limit: int
    vocab_size: int


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterKey | None  # a single adapter
    mix: MixSpec | None  # or a mix; neither = the base model
    tenant: str
    n: int = 1  # samples of the prompt
    messages: tuple[ChatTurn, ...] = ()  # the conversation a chat prompt was rendered from
    max_new_tokens_asked: int = 0  # as the request said (0: the worker's default)


def parse_request(
    request: inference_pb2.GenerateRequest,
    limits: Limits,
    prompter: Prompter | None,
    *,
    caller: Role | None,
    default_tenant: str | None = None,
) -> ParsedRequest:
    """Check every field of `request` against `limits`; `prompter` turns prompt text and
    conversations into ids (None: token ids only). The tenant billed depends on who sent it
    (`caller`, None on a server that does not check callers)."""
    check_generate_request(request, require_tenant=False)
    request_id = request.request_id or uuid.uuid4().hex
    prompt, field = _prompt(request, limits, prompter)
    if len(prompt) >= limits.max_context:
        raise InvalidArgument(
            field,
            f"the prompt has {len(prompt)} tokens; this worker's context holds {limits.max_context} "
            "(prompt and generated tokens together)",
        )
    sampling = _sampling(request, len(prompt), limits)
    if request.HasField("response_format"):
        sampling = dataclasses.replace(sampling, constraint=constraint_of(request.response_format))
    kind = request.WhichOneof("adapter")
    ref = request.adapter_ref
    adapter = AdapterKey(ref.id, ref.version) if kind == "adapter_ref" else None
    mix = mix_spec(request.mix, "mix") if kind == "mix" else None
    tenant = billed_tenant(request.tenant, caller, default_tenant)
    n = request.sampling.n or 1
    if n > MAX_SAMPLES:
        raise InvalidArgument("sampling.n", f"at most {MAX_SAMPLES} samples per request")
    messages = tuple(ChatTurn(m.role, m.content) for m in request.messages.messages)
    asked = request.sampling.max_new_tokens
    return ParsedRequest(request_id, prompt, sampling, adapter, mix, tenant, n, messages, asked)


def mix_spec(message: common_pb2.AdapterMix, field: str = "adapter_mix") -> MixSpec:
    """Check a wire mix; every refusal names the offending field."""
    strategy = STRATEGIES.get(message.strategy)
    if strategy is None:
        raise InvalidArgument(f"{field}.strategy", "must be LINEAR, TIES, DARE_LINEAR or DARE_TIES")
    components = tuple((c.adapter.id, c.adapter.version, float(c.weight)) for c in message.components)
    shares = check_mix_components(f"{field}.components", components)
    density = 1.0
    if strategy != "LINEAR":
        density = float(message.density)
        if not 0 < density <= 1:
            raise InvalidArgument(f"{field}.density", f"must be in (0, 1] for {strategy}, got {density}")
    return MixSpec(components, strategy, density, int(message.rank), int(message.seed), tuple(shares))


def billed_tenant(named: str, caller: Role | None, default_tenant: str | None) -> str:
    """Who pays for a request: the tenant it names when the gateway sent it (the gateway stamps it
    from the caller's API key), this worker's default tenant for anyone else."""
    if caller is Role.GATEWAY or (caller is None and named):
        return check_tenant("tenant", named)
    if named and named != default_tenant:
        raise PermissionDenied(
            f"tenant: only the gateway may name the tenant a request is billed to; this call is "
            f"authenticated as {caller.value if caller else 'nobody'} (send it without a tenant"
            + (f" to bill {default_tenant!r})" if default_tenant else ")")
        )
    if default_tenant is None:
        raise FailedPrecondition(
            "this worker bills requests that do not come from the gateway to no tenant: send them "
            "through the gateway, or set OPENLORA_WORKER_DEFAULT_TENANT (single-tenant setups)"
        )
    return default_tenant


def _prompt(
    request: inference_pb2.GenerateRequest, limits: Limits, prompter: Prompter | None
) -> tuple[list[int], str]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("text", "a prompt is required (text, token_ids or messages)")
    if kind == "messages":
        if prompter is None:
            raise InvalidArgument("messages", "this worker's model has no tokenizer: send token_ids")
        turns = request.messages.messages
        prompter.check_fits(sum(len(t.content) for t in turns), limits.max_context, "messages")
        return prompter.chat(turns), "messages"
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise InvalidArgument("token_ids", "the prompt is empty")
        bad = next((i for i in ids if i >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                "token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})"
            )
        return ids, "token_ids"
    if not request.text:
        raise InvalidArgument("text", "the prompt is empty")
    if prompter is None:
        raise InvalidArgument("text", "this worker's model has no tokenizer: send token_ids")
    prompter.check_fits(len(request.text), limits.max_context, "text")
    ids = prompter.encode(request.text)
    if not ids:
        raise InvalidArgument("text", "the prompt encodes to no tokens")
    return ids, "text"


def fitted_length(prompt_tokens: int, asked: int, limits: Limits) -> int:
    """The most tokens to generate after a prompt: `asked` when the context holds it (else the
    request's error), the worker's default shrunk to fit when 0 was asked."""
    room = limits.max_context - prompt_tokens
    if not asked:
        # The default is a convenience, not a demand: it shrinks to fit rather than fail.
        return min(limits.default_max_new_tokens, room)
    if asked > room:
        raise InvalidArgument(
            "sampling.max_new_tokens",
            f"prompt ({prompt_tokens}) + max_new_tokens ({asked}) exceeds this worker's "
            f"context of {limits.max_context} tokens",
        )
    return asked


def with_prompt(request: ParsedRequest, prompt: list[int], limits: Limits) -> ParsedRequest:
    """`request` with another rendering of its conversation (an adapter's own chat template),
    checked against the context as the first one was."""
    if len(prompt) >= limits.max_context:
        raise InvalidArgument(
            "messages",
            f"the prompt has {len(prompt)} tokens under the adapter's chat template; this worker's "
            f"context holds {limits.max_context} (prompt and generated tokens together)",
        )
    length = fitted_length(len(prompt), request.max_new_tokens_asked, limits)
    sampling = dataclasses.replace(request.sampling, max_new_tokens=length)
    return dataclasses.replace(request, prompt_token_ids=prompt, sampling=sampling)


def _sampling(request: inference_pb2.GenerateRequest, prompt_tokens: int, limits: Limits) -> SamplingParams:
    given = request.sampling
    if not math.isfinite(given.temperature) or given.temperature < 0:
        raise InvalidArgument("sampling.temperature", "must be a finite number >= 0 (0 means greedy)")
    top_p = given.top_p or 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument("sampling.top_p", "must be in (0, 1] (0 means unset)")
    if given.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidArgument(
            "sampling.max_new_tokens",
            f"{given.max_new_tokens} exceeds this worker's limit of {limits.max_new_tokens_limit}",
        )
    max_new_tokens = fitted_length(prompt_tokens, given.max_new_tokens, limits)
    stop = tuple(given.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, text in enumerate(stop):
        if not text or len(text) > MAX_STOP_CHARS:
            raise InvalidArgument(f"sampling.stop[{i}]", f"must hold 1 to {MAX_STOP_CHARS} characters")
    if request.top_logprobs and not request.return_logprobs:
        raise InvalidArgument("top_logprobs", "needs return_logprobs")
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument("top_logprobs", f"at most {MAX_TOP_LOGPROBS}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(given, name)
        if not math.isfinite(value) or not -2 <= value <= 2:
            raise InvalidArgument(f"sampling.{name}", "must be in [-2, 2]")
    repetition_penalty = given.repetition_penalty or 1.0
    if not math.isfinite(repetition_penalty) or repetition_penalty < 0:
        raise InvalidArgument("sampling.repetition_penalty", "must be > 0 (0 means unset)")
    if not math.isfinite(given.min_p) or not 0 <= given.min_p <= 1:
        raise InvalidArgument("sampling.min_p", "must be in [0, 1]")
    return SamplingParams(
        temperature=given.temperature,
        top_p=top_p,
        top_k=max(given.top_k, 0),
        seed=given.seed or None,
        max_new_tokens=max_new_tokens,
        stop=stop,
        ignore_eos=given.ignore_eos,
        logprobs=request.return_logprobs,
        top_logprobs=request.top_logprobs,
        frequency_penalty=given.frequency_penalty,
        presence_penalty=given.presence_penalty,
        repetition_penalty=repetition_penalty,
        min_p=given.min_p,
        logit_bias=_logit_bias(given, limits),
    )


def constraint_of(given: inference_pb2.ResponseFormat) -> Constraint:
    """The output constraint a request asks for, checked (an invalid schema, regex or grammar is the
    request's error, named here, not the engine's)."""
    kind = given.WhichOneof("format")
    if kind is None or (kind == "json_object" and not given.json_object):
        raise InvalidArgument("response_format", "name a format: json_object, json_schema, regex or grammar")
    spec = "" if kind == "json_object" else str(getattr(given, kind))
    if len(spec) > MAX_CONSTRAINT_CHARS:
        raise InvalidArgument(f"response_format.{kind}", f"longer than {MAX_CONSTRAINT_CHARS} characters")
    constraint = Constraint(kind, spec)
    check_constraint(constraint)
    return constraint


def _logit_bias(given: common_pb2.SamplingParams, limits: Limits) -> tuple[tuple[int, float], ...]:
    if len(given.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument("sampling.logit_bias", f"at most {MAX_LOGIT_BIAS} tokens")
    for token_id, bias in given.logit_bias.items():
        if token_id >= limits.vocab_size:
            raise InvalidArgument(
                f"sampling.logit_bias[{token_id}]",
                f"token id outside the vocabulary [0, {limits.vocab_size})",
            )
        if not math.isfinite(bias) or not -100 <= bias <= 100:
            raise InvalidArgument(f"sampling.logit_bias[{token_id}]", "bias must be in [-100, 100]")
    return tuple(sorted((int(t), float(b)) for t, b in given.logit_bias.items()))
