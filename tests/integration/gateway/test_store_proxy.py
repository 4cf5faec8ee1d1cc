"""The tenant-facing AdapterStore API through the gateway, against a real store."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import common_pb2

from tests.integration.gateway.conftest import (
    BASE,
    PRIVATE_ADAPTER,
    PUBLIC_ADAPTER,
    StoreUnderTest,
    put_adapter,
)
from tests.integration.gateway.kit import (
    ACME_KEY,
    GLOBEX_KEY,
    GatewayUnderTest,
    auth,
    bad_field,
    generate,
    generate_request,
)


def ref(adapter_id: str) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(id=adapter_id)


async def upload_as(
    store_gateway: GatewayUnderTest, key: str, header: store_pb.UploadHeader, folder: Path
) -> store_pb.AdapterInfo:
    return await upload(store_gateway.store, header, adapter_files(folder), metadata=auth(key), timeout=30)


async def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value.code()


async def test_uploads_belong_to_the_caller_and_are_named_under_it(
    store_gateway: GatewayUnderTest, store: StoreUnderTest
) -> None:
    header = store_pb.UploadHeader(
        id="globex/tuned", owner="acme", base_model=BASE, visibility=store_pb.PRIVATE
    )
    info = await upload_as(store_gateway, GLOBEX_KEY, header, store.adapter_dir)
    assert (info.id, info.owner) == ("globex/tuned", "globex")  # the claimed owner was overwritten

    for bad_id in ("tuned", "acme/tuned"):
        header.id = bad_id
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await upload_as(store_gateway, GLOBEX_KEY, header, store.adapter_dir)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field(error.value) == "header.id"

    # The new private adapter serves its owner and is invisible to others.
    await generate(store_gateway.stub, generate_request(adapter="globex/tuned"), key=GLOBEX_KEY)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate(store_gateway.stub, generate_request(adapter="globex/tuned"), key=ACME_KEY)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tenants_see_public_adapters_and_their_own(
    store_gateway: GatewayUnderTest, store: StoreUnderTest
) -> None:
    await put_adapter(store.stub, store.adapter_dir, "globex/mine", owner="globex", public=False)
    as_globex = await store_gateway.store.List(store_pb.ListAdaptersRequest(), metadata=auth(GLOBEX_KEY))
    assert {a.id for a in as_globex.adapters} == {PUBLIC_ADAPTER, "globex/mine"}
    as_acme = await store_gateway.store.List(store_pb.ListAdaptersRequest(), metadata=auth(ACME_KEY))
    assert {a.id for a in as_acme.adapters} == {PUBLIC_ADAPTER, PRIVATE_ADAPTER}

    info = await store_gateway.store.Get(
        store_pb.GetAdapterRequest(adapter=ref(PRIVATE_ADAPTER)), metadata=auth(ACME_KEY)
    )
    assert info.owner == "acme"
    hidden = store_gateway.store.Get(
        store_pb.GetAdapterRequest(adapter=ref(PRIVATE_ADAPTER)), metadata=auth(GLOBEX_KEY)
    )
    assert await status_of(hidden) == grpc.StatusCode.NOT_FOUND
    download = store_gateway.store.Download(
        store_pb.DownloadRequest(adapter=ref(PRIVATE_ADAPTER)), metadata=auth(GLOBEX_KEY)
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in download:
            pass
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    chunks = [
        c
        async for c in store_gateway.store.Download(
            store_pb.DownloadRequest(adapter=ref(PUBLIC_ADAPTER)), metadata=auth(GLOBEX_KEY)
        )
    ]
    assert chunks[0].header.info.id == PUBLIC_ADAPTER and len(chunks) > 1


async def test_only_owners_delete(store_gateway: GatewayUnderTest, store: StoreUnderTest) -> None:
    def delete(adapter_id: str, key: str) -> object:
        return store_gateway.store.Delete(
            store_pb.DeleteAdapterRequest(adapter=ref(adapter_id)), metadata=auth(key)
        )

    assert await status_of(delete(PRIVATE_ADAPTER, GLOBEX_KEY)) == grpc.StatusCode.NOT_FOUND
    assert await status_of(delete(PUBLIC_ADAPTER, GLOBEX_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    deleted = await delete(PRIVATE_ADAPTER, ACME_KEY)  # type: ignore[misc]
    assert len(deleted.deleted_versions) == 1
    still = await store.stub.List(store_pb.ListAdaptersRequest())
    assert {a.id for a in still.adapters} == {PUBLIC_ADAPTER}


async def test_operator_calls_and_anonymous_calls_are_refused(store_gateway: GatewayUnderTest) -> None:
    register = store_gateway.store.RegisterBaseModel(
        store_pb.RegisterBaseModelRequest(name="x", config_json="{}"), metadata=auth(ACME_KEY)
    )
    assert await status_of(register) == grpc.StatusCode.PERMISSION_DENIED
    anonymous = store_gateway.store.List(store_pb.ListAdaptersRequest())
    assert await status_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED
    bases = await store_gateway.store.ListBaseModels(
        store_pb.ListBaseModelsRequest(), metadata=auth(ACME_KEY)
    )
    assert [b.name for b in bases.base_models] == [BASE]
