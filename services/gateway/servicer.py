"""The public `Inference` service: authenticate, admit, check adapter access, stamp, relay."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from openlora.v1 import inference_pb2, inference_pb2_grpc

from services.common.contracts import SERVICE_NAMES
from services.common.errors import Unavailable
from services.common.grpc_server import ServiceBinding
from services.common.log import current_request_id
from services.common.request_checks import check_generate_request
from services.gateway.access import AdapterAccess
from services.gateway.auth import Authenticator
from services.gateway.keys import KeySource
from services.gateway.limits import TenantLimiter
from services.gateway.membership import WorkerPool
from services.gateway.metrics import GatewayMetrics
from services.gateway.outcome import CallOutcome
from services.gateway.relay import NO_WORKER_RETRY_S, Relay
from services.gateway.upstream import UpstreamError

LIST_MODELS_TIMEOUT_S = 10.0
KEY_RECHECK_S = 1.0


class GatewayInference(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        *,
        authenticate: Authenticator,
        keys: KeySource,
        limiter: TenantLimiter,
        access: AdapterAccess | None,
        relay: Relay,
        pool: WorkerPool,
        metrics: GatewayMetrics,
    ) -> None:
        self.authenticate = authenticate
        self.keys = keys
        self.limiter = limiter
        self.access = access
        self.relay = relay
        self.pool = pool
        self.metrics = metrics

    async def Generate(  # type: ignore[override]  # chunks go out as the worker serialized them
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[bytes]:
        """A Generate call from either front: gRPC's, or the HTTP API's with a context that answers
        what a gRPC context does (its metadata, the time left) and names the route it came by."""
        method = getattr(context, "method_label", "Generate")
        with CallOutcome(self.metrics, method, context) as call:
            tenant = call.tenant = self.authenticate(context).tenant
            # Refused here what a worker or attribution would refuse later: once a worker streams a
            # request, its usage must be recordable.
            check_generate_request(request, require_tenant=False)
            lease = self.limiter.admit(tenant, self.keys.limits_of(tenant))
            try:
                if self.access is not None:
                    await self.access.check_request(tenant, request)
                forwarded = inference_pb2.GenerateRequest()
                forwarded.CopyFrom(request)
                forwarded.tenant = tenant  # whatever the client put there is ignored
                # One id across retries, so the attempts share a label in logs and in the ledger.
                # It is not the ledger's key: each worker bills its own attempt under a usage id
                # of its own (retries happen before any chunk reached the client, so at most a
                # chunk lost in flight is billed twice).
                forwarded.request_id = request.request_id or current_request_id() or uuid.uuid4().hex
                recheck_at = time.monotonic() + KEY_RECHECK_S
                async for chunk in self.relay.generate(forwarded, context, lease):
                    if time.monotonic() >= recheck_at:
                        # A key revoked (or removed) mid-stream stops the stream within a second.
                        recheck_at = time.monotonic() + KEY_RECHECK_S
                        self.authenticate(context)
                    yield chunk
            finally:
                lease.release()

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        """The base model and engine of the least loaded worker. Worker caches hold every tenant's
        adapters, so they (and the worker's id) are left out; operators ask workers directly."""
        with CallOutcome(self.metrics, "ListModels", context) as call:
            call.tenant = self.authenticate(context).tenant
            return await self.base_model(context.time_remaining())

    async def base_model(self, time_remaining: float | None) -> inference_pb2.ListModelsResponse:
        """What the least loaded worker serves, without its cache or id."""
        for load in sorted(self.pool.healthy_loads(), key=lambda w: w.in_flight):
            endpoint = self.pool.get(load.address)
            if endpoint is None:
                continue
            timeout = (
                LIST_MODELS_TIMEOUT_S
                if time_remaining is None
                else min(time_remaining, LIST_MODELS_TIMEOUT_S)
            )
            try:
                response: inference_pb2.ListModelsResponse = await endpoint.stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    endpoint.report_failure()
                    continue
                raise UpstreamError(exc) from None
            del response.adapters[:]
            response.worker_id = ""
            return response
        raise Unavailable("no inference worker is available", retry_after_s=NO_WORKER_RETRY_S)


def binding(servicer: GatewayInference) -> ServiceBinding:
    """The public `Inference` service. Generate's chunks are sent as the worker serialized them, so
    its handler yields bytes and the service is registered with a pass-through serializer."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=inference_pb2.GenerateRequest.FromString,
            response_serializer=None,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=inference_pb2.ListModelsRequest.FromString,
            response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
        ),
    }
    name = SERVICE_NAMES["inference"]

    def attach(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)

    return ServiceBinding(name=name, attach=attach)
