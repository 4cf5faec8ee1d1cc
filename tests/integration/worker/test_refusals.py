"""Every bad request gets a clear status naming the field, from a real worker, store and model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import common_pb2, inference_pb2

from services.cluster.synthetic_adapters import write_adapter
from tests.integration.inference.cache_kit import Store, small_adapter, start_store
from tests.integration.worker.kit import WorkerUnderTest, bad_field, collect, request, worker_settings

# One worker and store for the module: a refusal leaves nothing behind (one test checks that), and
# starting a worker per case cost ~9 s each, more than the rest of these tests together.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> AsyncIterator[tuple[Store, WorkerUnderTest]]:
    tmp_path = tmp_path_factory.mktemp("refusals")
    store = await start_store(tmp_path / "store", tiny_llama_dir)
    await store.upload(small_adapter(tiny_llama_dir, tmp_path / "ok", seed=1), "ok")
    await store.upload(small_adapter(tiny_llama_dir, tmp_path / "wide", seed=2, rank=32), "wide")
    # A second base model with other shapes, and an adapter trained for it.
    other = json.loads((tiny_llama_dir / "config.json").read_text()) | {"hidden_size": 96, "head_dim": 24}
    await store.stub.RegisterBaseModel(
        store_pb.RegisterBaseModelRequest(name="other", config_json=json.dumps(other))
    )
    folder = write_adapter(tmp_path / "foreign", other, rank=4, targets=["q_proj", "v_proj"], seed=3)
    header = store_pb.UploadHeader(id="foreign", owner="acme", base_model="other")
    await upload(store.stub, header, adapter_files(folder))
    # The same shapes registered under another name: only the name tells the adapter apart.
    twin_config = (tiny_llama_dir / "config.json").read_text()
    await store.stub.RegisterBaseModel(
        store_pb.RegisterBaseModelRequest(name="tiny-twin", config_json=twin_config)
    )
    twin = small_adapter(tiny_llama_dir, tmp_path / "twin", seed=4)
    await upload(
        store.stub,
        store_pb.UploadHeader(id="twin", owner="acme", base_model="tiny-twin"),
        adapter_files(twin),
    )
    settings = worker_settings(
        tmp_path,
        tiny_llama_dir,
        store_address=f"127.0.0.1:{store.server.port}",
        max_context=64,
        store_base_model="tiny-llama",
    )
    worker = await WorkerUnderTest.start(settings)
    yield store, worker
    await worker.stop()
    await store.stop()


def _mix(**fields: Any) -> inference_pb2.GenerateRequest:
    message = request([1, 2, 3])
    message.mix.CopyFrom(common_pb2.AdapterMix(**fields))
    return message


def _part(adapter_id: str, weight: float) -> common_pb2.Component:
    return common_pb2.Component(adapter=common_pb2.AdapterRef(id=adapter_id), weight=weight)


def _no_prompt() -> inference_pb2.GenerateRequest:
    message = request([1])
    message.ClearField("token_ids")
    return message


BAD_REQUESTS: dict[str, tuple[inference_pb2.GenerateRequest, str]] = {
    "no prompt": (_no_prompt(), "text"),
    "empty text": (request(""), "text"),
    "empty token ids": (request([]), "token_ids"),
    "token id outside the vocabulary": (request([1, 10**6]), "token_ids"),
    "prompt longer than the context": (request(list(range(1, 80))), "token_ids"),
    "text longer than the context": (request("the adapter " * 60), "text"),
    "max_new_tokens over the limit": (request([1], max_new_tokens=10**6), "sampling.max_new_tokens"),
    "max_new_tokens past the context": (
        request(list(range(1, 40)), max_new_tokens=40),
        "sampling.max_new_tokens",
    ),
    "negative temperature": (request([1], temperature=-0.5), "sampling.temperature"),
    "nan temperature": (request([1], temperature=float("nan")), "sampling.temperature"),
    "top_p above 1": (request([1], top_p=1.5), "sampling.top_p"),
    "negative top_p": (request([1], top_p=-0.1), "sampling.top_p"),
    "empty stop string": (request([1], stop=["ok", ""]), "sampling.stop[1]"),
    "empty adapter id": (request([1], adapter=""), "adapter_ref.id"),
    "overlong request id": (request([1], request_id="r" * 200), "request_id"),
    "rank over r_max": (request([1], adapter="wide"), "adapter_ref"),
    "adapter of another base model": (request([1], adapter="foreign"), "adapter_ref"),
    "adapter of another base model with the same shapes": (request([1], adapter="twin"), "adapter_ref"),
    "mix with a component of another base model": (
        _mix(strategy=common_pb2.LINEAR, components=[_part("ok", 1.0), _part("twin", 1.0)]),
        "mix",
    ),
    "mix without components": (_mix(strategy=common_pb2.LINEAR), "mix.components"),
    "mix with no strategy": (_mix(components=[_part("ok", 1.0)]), "mix.strategy"),
    "mix with a zero weight": (
        _mix(strategy=common_pb2.LINEAR, components=[_part("ok", 1.0), _part("wide", 0.0)]),
        "mix.components[1].weight",
    ),
    "mix with an infinite weight": (
        _mix(strategy=common_pb2.LINEAR, components=[_part("ok", float("inf"))]),
        "mix.components[0].weight",
    ),
    "mix with density out of range": (
        _mix(strategy=common_pb2.TIES, density=1.5, components=[_part("ok", 1.0)]),
        "mix.density",
    ),
    "mix over r_max": (
        _mix(strategy=common_pb2.LINEAR, components=[_part("ok", 1.0), _part("wide", 1.0)]),
        "mix",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_name_their_field(served: tuple[Store, WorkerUnderTest], case: str) -> None:
    _, worker = served
    message, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(worker.stub, message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert bad_field(caught.value).startswith(field), caught.value.details()


async def test_unknown_adapter_is_not_found_and_nothing_is_left_behind(
    served: tuple[Store, WorkerUnderTest],
) -> None:
    _, worker = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(worker.stub, request([1, 2], adapter="nobody-has-this"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody-has-this" in (caught.value.details() or "")
    reply = await worker.stub.ListModels(inference_pb2.ListModelsRequest())
    assert (reply.stats.running_requests, reply.stats.waiting_requests, reply.stats.kv_blocks_used) == (
        0,
        0,
        0,
    )
    # The worker still serves afterwards, adapters included.
    assert len((await collect(worker.stub, request([1, 2], adapter="ok"))).token_ids) == 8


async def test_a_client_id_in_use_does_not_refuse_another_stream(
    served: tuple[Store, WorkerUnderTest],
) -> None:
    """Client ids are labels: a second stream under an id that is still streaming is served too."""
    _, worker = served
    first = worker.stub.Generate(request([1, 2], max_new_tokens=50, request_id="same"))
    await first.read()
    second = await collect(worker.stub, request([3], max_new_tokens=5, request_id="same"))
    assert second.completion_tokens == len(second.token_ids) == 5
    first.cancel()


async def test_an_adapter_refused_once_is_refused_again_and_a_good_one_served_again(
    served: tuple[Store, WorkerUnderTest],
) -> None:
    """The resolver remembers adapters that passed its shape check, never ones that failed it."""
    _, worker = served
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(worker.stub, request([1], adapter="wide"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert bad_field(caught.value).startswith("adapter_ref")
        assert len((await collect(worker.stub, request([1, 2], adapter="ok"))).token_ids) == 8
