"""The adapter store process: its catalog and blobs behind `AdapterStore` on the server kit."""

from __future__ import annotations

from openlora.v1 import adapter_store_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.adapter_store.service import AdapterStoreService
from services.adapter_store.servicer import AdapterStoreServicer
from services.adapter_store.settings import StoreSettings
from services.common.app import App
from services.common.contracts import SERVICE_NAMES
from services.common.grpc_server import ServiceBinding


class StoreApp(App):
    component = "store"

    def __init__(
        self,
        settings: StoreSettings,
        service: AdapterStoreService | None = None,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        super().__init__(settings, tracer_provider=tracer_provider)
        self.settings: StoreSettings = settings
        # Raises ServiceError, OSError or ValueError now when the backend cannot be used (S3 down).
        self.service = service or AdapterStoreService(settings)
        servicer = self.servicer = AdapterStoreServicer(self.service)
        self.serve(
            [
                ServiceBinding(
                    SERVICE_NAMES["adapter_store"],
                    lambda server: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(
                        servicer, server
                    ),
                )
            ]
        )

    async def release(self) -> None:
        self.servicer.ingest_pool.shutdown(wait=False, cancel_futures=True)  # drained by now

    def describe(self) -> str:
        s = self.settings
        where = s.local_dir if s.backend == "local" else f"s3://{s.s3_bucket}/{s.s3_prefix}"
        return f"backend {s.backend}: {where}"


def build(settings: StoreSettings, service: AdapterStoreService | None = None) -> StoreApp:
    """The store, not yet listening (build it inside the event loop that will run it)."""
    return StoreApp(settings, service)
