"""Generated gRPC stubs of the `openlora.v1` wire contracts (see protos/openlora/v1/).

Regenerate with `make protos`; CI fails when these are stale. Import the modules directly:

    from services.common.proto import inference_pb2, inference_pb2_grpc
"""

from services.common.proto import (
    adapter_store_pb2,
    adapter_store_pb2_grpc,
    attribution_pb2,
    attribution_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    relay_pb2,
    relay_pb2_grpc,
)

__all__ = [
    "adapter_store_pb2",
    "adapter_store_pb2_grpc",
    "attribution_pb2",
    "attribution_pb2_grpc",
    "common_pb2",
    "inference_pb2",
    "inference_pb2_grpc",
    "relay_pb2",
    "relay_pb2_grpc",
]

#: Fully qualified names of the services defined by the contracts, for health and reflection.
SERVICE_NAMES = {
    "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    "adapter_store": adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name,
    "attribution": attribution_pb2.DESCRIPTOR.services_by_name["Attribution"].full_name,
    "relay": relay_pb2.DESCRIPTOR.services_by_name["WorkerRelay"].full_name,
}
