"""The tenant-facing `AdapterStore` API, proxied to the store with the caller's tenant enforced.

- Upload and Import store the adapter as the caller's: `owner` is the tenant whatever the client
  sent, and the id must be `<tenant>/<name>`, so tenants can never add versions to each other's ids.
- Get, List and Download show public adapters and the caller's own; another tenant's private adapter
  is `NOT_FOUND`, exactly as if it did not exist.
- Delete removes the caller's own adapters only.
- Registering base models is for operators, on the store itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from openlora.transfer import UPLOAD_ACCEPTED
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc

from services.common.errors import InvalidArgument, PermissionDenied
from services.gateway.access import hidden, ownership
from services.gateway.auth import Authenticator
from services.gateway.metrics import GatewayMetrics
from services.gateway.outcome import CallOutcome
from services.gateway.upstream import UpstreamError


def check_owned_id(adapter_id: str, tenant: str, field: str) -> None:
    owner, sep, name = adapter_id.partition("/")
    if not sep or owner != tenant or not name:
        raise InvalidArgument(field, f"must be '{tenant}/<name>': a tenant's adapters are named under it")


class StoreProxy(adapter_store_pb2_grpc.AdapterStoreServicer):
    def __init__(
        self,
        store: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
        authenticate: Authenticator,
        metrics: GatewayMetrics,
    ) -> None:
        self.store = store
        self.authenticate = authenticate
        self.metrics = metrics

    def _call(self, method: str, context: Any) -> CallOutcome:
        return CallOutcome(self.metrics, f"AdapterStore.{method}", context)

    async def _visible(self, adapter: Any, tenant: str, context: Any) -> pb.AdapterInfo:
        try:
            info: pb.AdapterInfo = await self.store.Get(
                pb.GetAdapterRequest(adapter=adapter), timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as exc:
            raise UpstreamError(exc) from None
        if not ownership(info).visible_to(tenant):
            raise hidden(adapter)
        return info

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadChunk], context: Any) -> pb.AdapterInfo:
        with self._call("Upload", context) as call:
            tenant = call.tenant = self.authenticate(context).tenant
            chunks = aiter(request_iterator)
            first = await anext(chunks, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise InvalidArgument("header", "the first message of an upload must carry the header")
            check_owned_id(first.header.id, tenant, "header.id")
            first.header.owner = tenant

            async def forwarded() -> AsyncIterator[pb.UploadChunk]:
                yield first
                async for chunk in chunks:  # one chunk at a time: the upload is never held in memory
                    yield chunk

            # The header passed the gateway's checks: the client may send its bytes. (Waiting for the
            # store's own acceptance is not possible here: the tracing interceptor on the store
            # channel holds the call until its response, so its initial metadata never shows early.)
            await context.send_initial_metadata((UPLOAD_ACCEPTED,))
            try:
                info: pb.AdapterInfo = await self.store.Upload(forwarded(), timeout=context.time_remaining())
                return info
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None

    async def Import(self, request: pb.ImportRequest, context: Any) -> pb.AdapterInfo:
        with self._call("Import", context) as call:
            tenant = call.tenant = self.authenticate(context).tenant
            check_owned_id(request.id, tenant, "id")
            request.owner = tenant
            try:
                info: pb.AdapterInfo = await self.store.Import(request, timeout=context.time_remaining())
                return info
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None

    async def Get(self, request: pb.GetAdapterRequest, context: Any) -> pb.AdapterInfo:
        with self._call("Get", context) as call:
            call.tenant = self.authenticate(context).tenant
            return await self._visible(request.adapter, call.tenant, context)

    async def List(self, request: pb.ListAdaptersRequest, context: Any) -> pb.ListAdaptersResponse:
        """A page may hold fewer adapters than asked once hidden ones are removed; the token still
        points past the whole page, so paging stays complete."""
        with self._call("List", context) as call:
            tenant = call.tenant = self.authenticate(context).tenant
            try:
                page: pb.ListAdaptersResponse = await self.store.List(
                    request, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None
            visible = [info for info in page.adapters if ownership(info).visible_to(tenant)]
            return pb.ListAdaptersResponse(adapters=visible, next_page_token=page.next_page_token)

    async def Delete(self, request: pb.DeleteAdapterRequest, context: Any) -> pb.DeleteAdapterResponse:
        with self._call("Delete", context) as call:
            tenant = call.tenant = self.authenticate(context).tenant
            info = await self._visible(request.adapter, tenant, context)
            if info.owner != tenant:
                raise PermissionDenied(
                    f"adapter {info.id!r} is another tenant's; only its owner may delete it"
                )
            try:
                response: pb.DeleteAdapterResponse = await self.store.Delete(
                    request, timeout=context.time_remaining()
                )
                return response
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None

    async def Download(self, request: pb.DownloadRequest, context: Any) -> AsyncIterator[pb.DownloadChunk]:
        with self._call("Download", context) as call:
            call.tenant = self.authenticate(context).tenant
            await self._visible(request.adapter, call.tenant, context)
            stream = self.store.Download(request, timeout=context.time_remaining())
            try:
                async for chunk in stream:
                    yield chunk
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None
            finally:
                stream.cancel()

    async def RegisterBaseModel(self, request: pb.RegisterBaseModelRequest, context: Any) -> pb.BaseModel:
        with self._call("RegisterBaseModel", context) as call:
            call.tenant = self.authenticate(context).tenant
            raise PermissionDenied("base models are registered by the operator, on the adapter store itself")

    async def ListBaseModels(
        self, request: pb.ListBaseModelsRequest, context: Any
    ) -> pb.ListBaseModelsResponse:
        with self._call("ListBaseModels", context) as call:
            call.tenant = self.authenticate(context).tenant
            try:
                response: pb.ListBaseModelsResponse = await self.store.ListBaseModels(
                    request, timeout=context.time_remaining()
                )
                return response
            except grpc.aio.AioRpcError as exc:
                raise UpstreamError(exc) from None
