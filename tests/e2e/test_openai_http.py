"""The OpenAI-compatible HTTP API, driven by the real `openai` SDK and `curl` against the real cluster
processes (`openlora up`, tiny model): chat and text completions, streamed and whole, sync and async,
`models.list()`, errors; and the same request over HTTP and over gRPC gives the same tokens, the chat
prompt being exactly `tokenizer.apply_chat_template(..., add_generation_prompt=True)`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any, cast

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openlora import Client, MixComponent
from transformers import AutoTokenizer

from services.cluster.up import Cluster, ClusterConfig
from tests.e2e.cluster_kit import running_cluster, upload_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = "e2e"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
# An adapter's own chat template, unlike the tiny tokenizer's.
OWN_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
MESSAGES = cast(list[ChatCompletionMessageParam], CONVERSATION)  # the SDK's own type for them


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        data_dir=tmp_path_factory.mktemp("cluster"), model="tiny", gateway_port=0, http_port=0, tenant=TENANT
    )
    with running_cluster(config, {}) as (running, _logs):
        for name, seed in (("alpha", 1), ("beta", 2)):
            asyncio.run(upload_adapter(running, name, seed, tmp_path_factory.mktemp(name)))
        asyncio.run(upload_adapter(running, "gamma", 3, tmp_path_factory.mktemp("gamma"), OWN_TEMPLATE))
        yield running


@pytest.fixture(scope="module")
def sdk(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=cluster.api_key, max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.gateway, api_key=cluster.api_key) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(cluster: Cluster) -> Any:
    return AutoTokenizer.from_pretrained(cluster.model_dir)


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    from services.inference.token_bytes import TokenBytes

    return TokenBytes(tokenizer)(ids)


def test_models_list_shows_the_base_model_and_the_tenants_adapters(
    sdk: openai.OpenAI, cluster: Cluster
) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {cluster.base_model, *(f"{TENANT}/{n}" for n in ("alpha", "beta", "gamma"))}
    assert models[f"{TENANT}/alpha"].owned_by == TENANT
    assert sdk.models.retrieve(f"{TENANT}/beta").id == f"{TENANT}/beta"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("someone/else")


def test_a_chat_over_http_is_the_chat_template_and_the_same_tokens_as_grpc(
    sdk: openai.OpenAI, grpc_client: Client, tokenizer: Any, cluster: Cluster
) -> None:
    templated = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    over_ids = grpc_client.generate(templated, max_new_tokens=12, adapter=f"{TENANT}/alpha", ignore_eos=True)
    over_messages = grpc_client.generate(
        CONVERSATION, max_new_tokens=12, adapter=f"{TENANT}/alpha", ignore_eos=True
    )
    assert over_messages.token_ids == over_ids.token_ids
    assert over_messages.prompt_tokens == len(templated)
    reply = sdk.chat.completions.create(
        model=f"{TENANT}/alpha",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.message.content == over_ids.text
    assert reply.usage is not None and reply.usage.prompt_tokens == len(templated)
    assert reply.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert [bytes(t.bytes or []) for t in content] == token_bytes(tokenizer, over_ids.token_ids)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_text_completions_streamed_and_whole_match_grpc(
    sdk: openai.OpenAI, grpc_client: Client, cluster: Cluster
) -> None:
    expected = grpc_client.generate("The quick brown fox", max_new_tokens=10, ignore_eos=True)
    whole = sdk.completions.create(
        model=cluster.base_model,
        prompt="The quick brown fox",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].text == expected.text
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    events = list(
        sdk.completions.create(
            model=cluster.base_model,
            prompt="The quick brown fox",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(e.choices[0].text for e in events if e.choices) == expected.text
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.prompt_tokens == expected.prompt_tokens
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"


def test_the_async_sdk_streams_a_chat_with_a_mix_as_grpc_serves_it(
    cluster: Cluster, grpc_client: Client
) -> None:
    mix = {"components": [{"id": f"{TENANT}/alpha", "weight": 0.7}, {"id": f"{TENANT}/beta", "weight": 0.3}]}
    expected = grpc_client.generate(
        CONVERSATION,
        max_new_tokens=8,
        ignore_eos=True,
        mix=[MixComponent(f"{TENANT}/alpha", 0.7), MixComponent(f"{TENANT}/beta", 0.3)],
    )

    async def chat() -> tuple[str, list[str | None]]:
        async with openai.AsyncOpenAI(
            base_url=f"{cluster.http_url}/v1", api_key=cluster.api_key, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=cluster.base_model,
                messages=MESSAGES,
                max_tokens=8,
                temperature=0,
                stream=True,
                extra_body={"mix": mix, "ignore_eos": True},
            )
            deltas: list[str] = []
            roles: list[str | None] = []
            async for event in stream:
                deltas.append(event.choices[0].delta.content or "")
                roles.append(event.choices[0].delta.role)
            return "".join(deltas), roles

    text, roles = asyncio.run(chat())
    assert text == expected.text
    assert roles[0] == "assistant" and set(roles[1:]) <= {None}


def test_penalties_bias_and_seeds_mean_the_same_over_http_and_grpc(
    sdk: openai.OpenAI, grpc_client: Client, cluster: Cluster, tokenizer: Any
) -> None:
    options: dict[str, Any] = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {7: 5.0}}
    expected = grpc_client.generate("penalised", max_new_tokens=10, ignore_eos=True, **options)
    reply = sdk.completions.create(
        model=cluster.base_model,
        prompt="penalised",
        max_tokens=10,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias={"7": 5},
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == expected.text
    plain = grpc_client.generate("penalised", max_new_tokens=10, ignore_eos=True)
    assert plain.token_ids != expected.token_ids, "the penalties changed the greedy output"
    sampled = [
        sdk.completions.create(
            model=cluster.base_model,
            prompt="seeded",
            max_tokens=8,
            temperature=1.0,
            seed=11,
            extra_body={"min_p": 0.01, "repetition_penalty": 1.2},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_curl_streams_server_sent_events_ending_in_done(cluster: Cluster, sdk: openai.OpenAI) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = {
        "model": cluster.base_model,
        "messages": CONVERSATION,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    result = subprocess.run(
        [
            *("curl", "-sSN", f"{cluster.http_url}/v1/chat/completions", "-D", "-"),
            *("-H", f"Authorization: Bearer {cluster.api_key}", "-H", "Content-Type: application/json"),
            *("-H", "x-request-id: curl-req-1", "-d", json.dumps(body)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    head, _, stream = result.stdout.partition("\n\n")  # text mode reads CRLF as LF
    assert "text/event-stream" in head and "x-request-id: curl-req-1" in head.lower()
    lines = [line for line in stream.splitlines() if line]
    assert lines, result.stdout
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {e["id"] for e in events} == {"chatcmpl-curl-req-1"}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    whole = sdk.chat.completions.create(
        model=cluster.base_model,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert streamed == whole.choices[0].message.content


def test_errors_are_openai_error_objects_with_their_statuses(cluster: Cluster, sdk: openai.OpenAI) -> None:
    stranger = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="e2e/nope", messages=MESSAGES)
    assert "not found" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.completions.create(model=cluster.base_model, prompt="x", max_tokens=10**6)
    assert isinstance(too_long.value.body, dict) and too_long.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as several:
        sdk.chat.completions.create(model=cluster.base_model, messages=MESSAGES, n=17)
    assert isinstance(several.value.body, dict) and several.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as bad_type:
        sdk.chat.completions.create(model=cluster.base_model, messages=MESSAGES, temperature=9)
    assert isinstance(bad_type.value.body, dict) and bad_type.value.body["param"] == "temperature"
    assert bad_type.value.response.headers["x-request-id"]


def test_health(cluster: Cluster) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{cluster.http_url}/health", timeout=10) as reply:
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}


def test_n_samples_are_choices_billed_one_prompt_and_reproducible_with_a_seed(
    sdk: openai.OpenAI, grpc_client: Client, cluster: Cluster
) -> None:
    def four() -> openai.types.chat.ChatCompletion:
        return sdk.chat.completions.create(
            model=f"{TENANT}/alpha",
            messages=MESSAGES,
            n=4,
            seed=5,
            temperature=1.0,
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )

    first, second = four(), four()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in second.choices], "same seed, same samples"
    assert len(set(texts)) > 1
    single = sdk.chat.completions.create(
        model=f"{TENANT}/alpha",
        messages=MESSAGES,
        temperature=1.0,
        seed=5,
        max_tokens=6,
        extra_body={"ignore_eos": True},
    )
    assert first.usage is not None and single.usage is not None
    assert first.usage.prompt_tokens == single.usage.prompt_tokens, "the prompt is billed once"
    assert first.usage.completion_tokens == 4 * 6
    # Streamed over gRPC, the samples' chunks interleave, each naming its sample.
    streamed: dict[int, str] = {}
    for chunk in grpc_client.stream(
        CONVERSATION,
        adapter=f"{TENANT}/alpha",
        n=4,
        seed=5,
        temperature=1.0,
        max_new_tokens=6,
        ignore_eos=True,
    ):
        streamed[chunk.index] = streamed.get(chunk.index, "") + chunk.text
    assert [streamed[i] for i in range(4)] == texts


def test_structured_output_over_http_validates_and_bad_schemas_are_400(
    sdk: openai.OpenAI, cluster: Cluster
) -> None:
    import jsonschema

    from tests.integration.inference.test_structured_output import SCHEMA

    pet_format: Any = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    reply = sdk.chat.completions.create(
        model=f"{TENANT}/beta",
        messages=MESSAGES,
        n=8,
        seed=1,
        temperature=1.0,
        max_tokens=256,
        response_format=pet_format,
    )
    assert len(reply.choices) == 8
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    regex = sdk.completions.create(
        model=cluster.base_model, prompt="code:", max_tokens=40, extra_body={"regex": r"[A-Z]{3}-\d{4}"}
    )
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.choices[0].text)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model=cluster.base_model, prompt="x", extra_body={"regex": "(unclosed"})
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "regex"
    with pytest.raises(openai.BadRequestError) as bad_schema:
        sdk.chat.completions.create(
            model=cluster.base_model,
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        )
    assert isinstance(bad_schema.value.body, dict)
    assert bad_schema.value.body["param"] == "response_format.json_schema.schema"


def test_an_adapters_own_chat_template_renders_its_conversations(
    sdk: openai.OpenAI, grpc_client: Client, tokenizer: Any
) -> None:
    own = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=OWN_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    base = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert own != base
    expected = grpc_client.generate(own, adapter=f"{TENANT}/gamma", max_new_tokens=8, ignore_eos=True)
    over_grpc = grpc_client.generate(
        CONVERSATION, adapter=f"{TENANT}/gamma", max_new_tokens=8, ignore_eos=True
    )
    assert (over_grpc.prompt_tokens, over_grpc.token_ids) == (len(own), expected.token_ids)
    reply = sdk.chat.completions.create(
        model=f"{TENANT}/gamma",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.prompt_tokens == len(own)
    assert reply.choices[0].message.content == expected.text
    # Another adapter, without a template of its own, keeps the base model's.
    plain = grpc_client.generate(CONVERSATION, adapter=f"{TENANT}/alpha", max_new_tokens=2, ignore_eos=True)
    assert plain.prompt_tokens == len(base)
