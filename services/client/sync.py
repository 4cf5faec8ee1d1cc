"""`Client`: the blocking client of the `Inference` API (same behaviour as `AsyncClient`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from services.client.channel import Deadline, call_metadata, credentials
from services.client.errors import OpenLoRAError
from services.client.request import Chunk, Completion, build_request
from services.client.retry import DEFAULT_RETRY, RetryPolicy
from services.common.proto import inference_pb2, inference_pb2_grpc


class Client:
    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        timeout_s: float | None = 300.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if ca_file or cert_file:
            self._channel = grpc.secure_channel(target, credentials(ca_file, cert_file, key_file))
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retry = retry

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str | Sequence[int], **options: Any) -> Generator[Chunk]:
        """Chunks as the server produces them; closing the iterator early cancels the call."""
        request = build_request(prompt, **options)
        deadline = Deadline(self.timeout_s)
        attempt = received = 0
        while True:
            attempt += 1
            call = self._stub.Generate(
                request,
                metadata=call_metadata(self.api_key, request.request_id),
                timeout=deadline.remaining(),
            )
            try:
                for reply in call:
                    received += 1
                    yield Chunk.from_proto(reply)
                return
            except grpc.RpcError as exc:
                error = OpenLoRAError.from_rpc(exc)
                delay = self.retry.delay(error, attempt, received)
                if delay is None or not deadline.allows(delay):
                    raise error from None
                time.sleep(delay)
            finally:
                call.cancel()

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        options["request_id"] = options.get("request_id") or uuid.uuid4().hex
        completion = Completion(options["request_id"])
        for chunk in self.stream(prompt, **options):
            completion.add(chunk)
        return completion

    def list_models(self) -> inference_pb2.ListModelsResponse:
        try:
            reply: inference_pb2.ListModelsResponse = self._stub.ListModels(
                inference_pb2.ListModelsRequest(),
                metadata=call_metadata(self.api_key, uuid.uuid4().hex),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
        return reply
