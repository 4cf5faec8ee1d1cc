"""`Client`: the blocking client (generation, models, your adapters); `AsyncClient` is its asyncio twin."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from openlora import adapters
from openlora.adapters import AdapterInfo, Provenance, adapter_ref
from openlora.channel import Connection, Deadline, call_metadata
from openlora.errors import OpenLoRAError
from openlora.files import adapter_files
from openlora.models import Models
from openlora.request import Chunk, Completion, GenerateOptions, Prompt, build_request, one_sample
from openlora.retry import DEFAULT_RETRY, RetryPolicy
from openlora.transfer import DownloadError, DownloadWriter, Progress, upload_messages
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, inference_pb2, inference_pb2_grpc

R = TypeVar("R")


class Client:
    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        tls: bool | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        timeout_s: float | None = 300.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        """`target` is the gateway's `host:port` (any gRPC target). Unset arguments come from
        `OPENLORA_TARGET`, `OPENLORA_API_KEY`, `OPENLORA_TLS` and `OPENLORA_CA_FILE`; TLS with no CA
        file trusts the system's roots. `timeout_s` bounds a whole call, retries included."""
        self.connection = Connection.resolve(target, api_key, tls, ca_file, cert_file, key_file)
        if self.connection.credentials is not None:
            self._channel = grpc.secure_channel(self.connection.target, self.connection.credentials)
        else:
            self._channel = grpc.insecure_channel(self.connection.target)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._store = adapter_store_pb2_grpc.AdapterStoreStub(self._channel)
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

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generator[Chunk]:
        """Chunks as the server produces them; closing the iterator early cancels the call."""
        request = build_request(prompt, **options)
        deadline = Deadline(self.timeout_s)
        attempt = received = 0
        while True:
            attempt += 1
            call = self._inference.Generate(
                request,
                metadata=call_metadata(self.connection.api_key, request.request_id),
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

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """The whole completion at once."""
        one_sample(options)
        request_id = options["request_id"] = options.get("request_id") or uuid.uuid4().hex
        completion = Completion(request_id)
        for chunk in self.stream(prompt, **options):
            completion.add(chunk)
        return completion

    def list_models(self) -> Models:
        """The base model and the adapters a worker holds, fastest tier first."""
        return Models.from_proto(self._call(self._inference.ListModels, inference_pb2.ListModelsRequest()))

    def upload_adapter(
        self,
        source: Path,
        adapter_id: str,
        *,
        base_model: str,
        public: bool = False,
        provenance: Provenance | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        """Upload a PEFT folder (or a .tar/.tar.gz of one) as a new version of `adapter_id`, which is
        `<your tenant>/<name>` through the gateway."""
        header = adapters.upload_header(adapter_id, base_model, public, provenance)
        messages = upload_messages(header, adapter_files(Path(source)), progress)
        return AdapterInfo.from_proto(self._call(self._store.Upload, messages))

    def import_adapter(
        self,
        source_uri: str,
        *,
        adapter_id: str = "",
        base_model: str = "",
        public: bool = False,
        provenance: Provenance | None = None,
    ) -> AdapterInfo:
        """Have the store fetch, validate and keep an adapter from `hf://`, `s3://` or `https://`."""
        request = adapters.import_request(source_uri, adapter_id, base_model, public, provenance)
        return AdapterInfo.from_proto(self._call(self._store.Import, request))

    def get_adapter(self, adapter: str) -> AdapterInfo:
        """`id` (the latest version) or `id@version`."""
        request = store_pb.GetAdapterRequest(adapter=adapter_ref(adapter))
        return AdapterInfo.from_proto(self._call(self._store.Get, request))

    def list_adapters(self, *, base_model: str = "", owner: str = "") -> list[AdapterInfo]:
        """The latest version of every adapter you may use (public ones and your own), every page."""
        found: list[AdapterInfo] = []
        token = ""
        while True:
            page = self._call(self._store.List, adapters.list_request(base_model, owner, token))
            found += map(AdapterInfo.from_proto, page.adapters)
            if not (token := page.next_page_token):
                return found

    def delete_adapter(self, adapter: str) -> list[str]:
        """Delete one version (`id@version`) or every version (`id`) of your adapter; the versions gone."""
        request = store_pb.DeleteAdapterRequest(adapter=adapter_ref(adapter))
        return list(self._call(self._store.Delete, request).deleted_versions)

    def download_adapter(self, adapter: str, dest: Path, *, progress: Progress | None = None) -> AdapterInfo:
        """Write the adapter's PEFT files into `dest`, each checked against its declared sha256."""
        writer = DownloadWriter(Path(dest), progress)
        request = store_pb.DownloadRequest(adapter=adapter_ref(adapter))
        try:
            for chunk in self._call(self._store.Download, request):
                writer.feed(chunk)
            return AdapterInfo.from_proto(writer.finish())
        except grpc.RpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
        except DownloadError as exc:
            raise OpenLoRAError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        finally:
            writer.close()

    def _call(self, method: Callable[..., R], request: Any) -> R:
        try:
            return method(
                request,
                metadata=call_metadata(self.connection.api_key, uuid.uuid4().hex),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
