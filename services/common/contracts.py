"""The gRPC services the wire contracts define, by the names health checks and reflection use."""

from openlora.v1 import adapter_store_pb2, attribution_pb2, inference_pb2, relay_pb2

SERVICE_NAMES = {
    "inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    "adapter_store": adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].full_name,
    "attribution": attribution_pb2.DESCRIPTOR.services_by_name["Attribution"].full_name,
    "relay": relay_pb2.DESCRIPTOR.services_by_name["WorkerRelay"].full_name,
}
