"""Generated stubs of the `openlora.v1` wire contracts (protos/openlora/v1/ in the repository).

Regenerated with `make protos`; CI fails when they are stale. Import the modules directly:

    from openlora.v1 import inference_pb2, inference_pb2_grpc
"""
