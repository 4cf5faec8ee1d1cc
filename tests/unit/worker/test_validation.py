"""`parse_request`: every field checked, defaults filled, nothing else needed (no engine, no gRPC)."""

from __future__ import annotations

import pytest
from openlora.v1 import common_pb2, inference_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.trust.roles import GATEWAY, OPERATOR
from services.inference.engine.output_format import Constraint
from services.inference.prompts import Prompter
from services.inference.validation import Limits, billed_tenant, parse_request

LIMITS = Limits(max_context=32, default_max_new_tokens=16, max_new_tokens_limit=20, vocab_size=100)


def tokenize(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


class CharTokenizer:
    """One id per character, and a chat template that tags each turn with its role."""

    chat_template = "<role>content ... <assistant>"

    def __len__(self) -> int:
        return 100

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return ["ab" if i == 7 else "a" for i in ids]  # token 7 holds two characters

    def encode(self, text: str) -> list[int]:
        return tokenize(text)

    def apply_chat_template(self, turns: list[dict[str, str]], **options: object) -> list[int]:
        assert options["add_generation_prompt"] and options["tokenize"]
        if turns[-1]["role"] == "assistant":
            raise ValueError("the last turn must not be the assistant's")
        return tokenize("".join(f"<{t['role']}>{t['content']}" for t in turns) + "<assistant>")


PROMPTER = Prompter(CharTokenizer())


def make(**fields: object) -> inference_pb2.GenerateRequest:
    """A request of `fields`, billed to tenant acme unless `tenant` says otherwise."""
    fields.setdefault("tenant", "acme")
    sampling = fields.pop("sampling", {})
    message = inference_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    message.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]
    return message


def fmt(**kind: str) -> inference_pb2.ResponseFormat:
    return inference_pb2.ResponseFormat(**kind)  # type: ignore[arg-type]


def chat(*turns: tuple[str, str]) -> inference_pb2.ChatMessages:
    return inference_pb2.ChatMessages(
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    )


def mix(*components: tuple[str, str, float]) -> common_pb2.AdapterMix:
    return common_pb2.AdapterMix(
        strategy=common_pb2.LINEAR,
        components=[
            common_pb2.Component(adapter=common_pb2.AdapterRef(id=i, version=v), weight=w)
            for i, v, w in components
        ],
    )


def test_defaults_make_a_greedy_request_with_an_id() -> None:
    parsed = parse_request(make(text="hello"), LIMITS, PROMPTER, caller=GATEWAY)
    assert parsed.prompt_token_ids == tokenize("hello")
    assert len(parsed.request_id) == 32
    s = parsed.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens) == (0.0, 1.0, 0, None, 16)
    assert parsed.adapter is None and parsed.mix is None


def test_the_default_length_shrinks_to_fit_the_context() -> None:
    parsed = parse_request(
        make(token_ids=inference_pb2.TokenIds(ids=[1] * 25)), LIMITS, PROMPTER, caller=GATEWAY
    )
    assert parsed.sampling.max_new_tokens == 7


def test_fields_are_carried_over() -> None:
    message = make(
        request_id="r1",
        tenant="acme",
        token_ids=inference_pb2.TokenIds(ids=[3, 4]),
        adapter_ref=common_pb2.AdapterRef(id="alpha", version="v2"),
        return_logprobs=True,
        sampling={
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 9,
            "max_new_tokens": 4,
            "stop": ["\n"],
        },
    )
    parsed = parse_request(message, LIMITS, None, caller=GATEWAY)
    assert (parsed.request_id, parsed.tenant, parsed.prompt_token_ids) == ("r1", "acme", [3, 4])
    assert parsed.adapter is not None and parsed.adapter.version == "v2"
    s = parsed.sampling
    assert (s.top_k, s.seed, s.max_new_tokens, s.stop, s.logprobs) == (5, 9, 4, ("\n",), True)
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9)


def test_two_explicit_versions_of_one_adapter_may_be_mixed() -> None:
    parsed = parse_request(
        make(text="hi", mix=mix(("a", "v1", 1.0), ("a", "v2", 3.0))), LIMITS, PROMPTER, caller=GATEWAY
    )
    assert parsed.mix is not None and parsed.mix.shares == (0.25, 0.75)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"token_ids": inference_pb2.TokenIds()}, "token_ids"),
        ({"token_ids": inference_pb2.TokenIds(ids=[100])}, "token_ids"),
        ({"text": "x" * 32}, "text"),
        ({"text": "hi", "sampling": {"max_new_tokens": 21}}, "sampling.max_new_tokens"),
        ({"text": "x" * 20, "sampling": {"max_new_tokens": 13}}, "sampling.max_new_tokens"),
        ({"text": "hi", "sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"text": "hi", "sampling": {"temperature": float("inf")}}, "sampling.temperature"),
        ({"text": "hi", "sampling": {"top_p": 1.01}}, "sampling.top_p"),
        ({"text": "hi", "sampling": {"top_p": float("nan")}}, "sampling.top_p"),
        ({"text": "hi", "sampling": {"stop": ["a"] * 17}}, "sampling.stop"),
        ({"text": "hi", "sampling": {"stop": ["x" * 257]}}, "sampling.stop[0]"),
        ({"text": "hi", "adapter_ref": common_pb2.AdapterRef()}, "adapter_ref.id"),
        ({"text": "hi", "request_id": "r" * 129}, "request_id"),
        ({"text": "hi", "tenant": "t" * 129}, "tenant"),
        # What attribution would refuse later, which would stop the worker's usage stream.
        ({"text": "hi", "request_id": "job 42"}, "request_id"),
        ({"text": "hi", "request_id": "job\n42"}, "request_id"),
        ({"text": "hi", "tenant": ""}, "tenant"),
        ({"text": "hi", "adapter_ref": common_pb2.AdapterRef(id="a b")}, "adapter_ref.id"),
        ({"text": "hi", "mix": mix(("a", "", 1.0), ("b", "", 1e-7))}, "mix.components[1].weight"),
        ({"text": "hi", "mix": mix(("a", "", 1.0), ("a", "v1", 1.0))}, "mix.components[1].adapter"),
        ({"text": "hi", "mix": mix(("a", "v1", 1.0), ("a", "v1", 1.0))}, "mix.components[1].adapter"),
        ({"text": "hi", "mix": mix(("a", "", float("inf")))}, "mix.components[0].weight"),
        ({"text": "hi", "top_logprobs": 2}, "top_logprobs"),
        ({"text": "hi", "top_logprobs": 21, "return_logprobs": True}, "top_logprobs"),
        ({"text": "hi", "sampling": {"frequency_penalty": 2.5}}, "sampling.frequency_penalty"),
        ({"text": "hi", "sampling": {"presence_penalty": float("nan")}}, "sampling.presence_penalty"),
        ({"text": "hi", "sampling": {"repetition_penalty": -1}}, "sampling.repetition_penalty"),
        ({"text": "hi", "sampling": {"min_p": 1.5}}, "sampling.min_p"),
        ({"text": "hi", "sampling": {"logit_bias": {100: 1.0}}}, "sampling.logit_bias[100]"),
        ({"text": "hi", "sampling": {"logit_bias": {5: 101.0}}}, "sampling.logit_bias[5]"),
        ({"messages": inference_pb2.ChatMessages()}, "messages"),
        ({"text": "hi", "response_format": inference_pb2.ResponseFormat()}, "response_format"),
        ({"text": "hi", "response_format": fmt(json_schema="{")}, "response_format.json_schema"),
        ({"text": "hi", "response_format": fmt(regex="(ab")}, "response_format.regex"),
        ({"text": "hi", "response_format": fmt(grammar="start: nope")}, "response_format.grammar"),
        ({"messages": chat(("", "hi"))}, "messages[0].role"),
        ({"messages": chat(("user", "hi"), ("assistant", "yo"))}, "messages"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_request(make(**fields), LIMITS, PROMPTER, caller=GATEWAY)
    assert caught.value.field == field


def test_a_conversation_is_rendered_with_the_chat_template() -> None:
    parsed = parse_request(
        make(messages=chat(("system", "be"), ("user", "hi"))), LIMITS, PROMPTER, caller=GATEWAY
    )
    assert parsed.prompt_token_ids == tokenize("<system>be<user>hi<assistant>")


def test_penalties_bias_and_top_logprobs_are_carried_over() -> None:
    sampling = {
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "repetition_penalty": 1.3,
        "min_p": 0.125,
        "logit_bias": {7: -100.0, 3: 2.5},
    }
    parsed = parse_request(
        make(text="hi", sampling=sampling, return_logprobs=True, top_logprobs=5),
        LIMITS,
        PROMPTER,
        caller=GATEWAY,
    )
    s = parsed.sampling
    assert (s.frequency_penalty, s.presence_penalty, s.min_p, s.top_logprobs) == (0.5, -0.25, 0.125, 5)
    assert s.repetition_penalty == pytest.approx(1.3)
    assert s.logit_bias == ((3, 2.5), (7, -100.0))
    unset = parse_request(make(text="hi"), LIMITS, PROMPTER, caller=GATEWAY).sampling
    assert unset.repetition_penalty == 1.0 and not unset.adjusts_logits


def test_text_needs_a_tokenizer() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_request(make(text="hi"), LIMITS, None, caller=GATEWAY)
    assert caught.value.field == "text" and "token_ids" in caught.value.problem


def test_only_the_gateway_names_the_tenant_billed() -> None:
    assert billed_tenant("acme", GATEWAY, None) == "acme"
    assert billed_tenant("acme", GATEWAY, "solo") == "acme"
    # Anyone else is billed to the worker's default tenant, and may not name another.
    assert billed_tenant("", OPERATOR, "solo") == "solo"
    assert billed_tenant("solo", OPERATOR, "solo") == "solo"
    with pytest.raises(PermissionDenied, match=r"only the gateway may name the tenant.*as operator"):
        billed_tenant("acme", OPERATOR, "solo")
    with pytest.raises(FailedPrecondition, match="OPENLORA_WORKER_DEFAULT_TENANT"):
        billed_tenant("", OPERATOR, None)
    # A server that checks no callers (open_rpcs) believes the request, as before.
    assert billed_tenant("acme", None, None) == "acme"
    assert billed_tenant("", None, "solo") == "solo"
    with pytest.raises(FailedPrecondition):
        billed_tenant("", None, None)


def test_a_direct_request_is_refused_before_it_is_parsed_into_work() -> None:
    with pytest.raises(FailedPrecondition):
        parse_request(make(text="hi", tenant=""), LIMITS, PROMPTER, caller=OPERATOR)
    parsed = parse_request(
        make(text="hi", tenant=""), LIMITS, PROMPTER, caller=OPERATOR, default_tenant="solo"
    )
    assert parsed.tenant == "solo"


def test_a_response_format_becomes_the_engines_constraint() -> None:
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    parsed = parse_request(
        make(text="hi", response_format=fmt(json_schema=schema)), LIMITS, PROMPTER, caller=GATEWAY
    )
    assert parsed.sampling.constraint == Constraint("json_schema", schema)
    json_object = inference_pb2.ResponseFormat(json_object=True)
    parsed = parse_request(make(text="hi", response_format=json_object), LIMITS, PROMPTER, caller=GATEWAY)
    assert parsed.sampling.constraint == Constraint("json_object")


def test_a_text_too_long_for_any_tokenisation_is_refused_before_tokenising() -> None:
    """32 tokens of context, at most 2 characters a token: 65 characters cannot fit, whatever they
    are, and are refused without running the tokenizer."""
    assert PROMPTER.max_token_chars == 2
    with pytest.raises(InvalidArgument) as caught:
        parse_request(make(text="x" * 65), LIMITS, PROMPTER, caller=GATEWAY)
    assert caught.value.field == "text" and "65 characters cannot fit" in caught.value.problem
    with pytest.raises(InvalidArgument) as chat_caught:
        parse_request(make(messages=chat(("user", "x" * 65))), LIMITS, PROMPTER, caller=GATEWAY)
    assert chat_caught.value.field == "messages"
    with pytest.raises(InvalidArgument) as long_prompt:  # 40 characters fit the bound but not the context
        parse_request(make(text="x" * 40), LIMITS, PROMPTER, caller=GATEWAY)
    assert "the prompt has 40 tokens" in long_prompt.value.problem
