"""`openlora store serve`: the adapter store on the common server kit."""

from __future__ import annotations

from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.config import StoreSettings
from services.adapter_store.service import AdapterStoreService
from services.adapter_store.servicer import AdapterStoreServicer
from services.common.contracts import SERVICE_NAMES
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.telemetry import setup_telemetry


def build_server(settings: StoreSettings, service: AdapterStoreService | None = None) -> GrpcServer:
    servicer = AdapterStoreServicer(service or AdapterStoreService(settings))
    binding = ServiceBinding(
        name=SERVICE_NAMES["adapter_store"],
        attach=lambda server: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(servicer, server),
    )
    provider = setup_telemetry("store", settings.telemetry)
    return GrpcServer(settings, [binding], component="store", tracer_provider=provider)
