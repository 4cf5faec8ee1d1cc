"""`AsyncClient`: the asyncio client, method for method the same as `Client`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
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
from openlora.transfer import DownloadError, DownloadWriter, Progress, upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, inference_pb2, inference_pb2_grpc

R = TypeVar("R")


class AsyncClient:
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
        """As `Client`: unset arguments come from `OPENLORA_TARGET`, `OPENLORA_API_KEY`,
        `OPENLORA_TLS` and `OPENLORA_CA_FILE`."""
        self.connection = Connection.resolve(target, api_key, tls, ca_file, cert_file, key_file)
        if self.connection.credentials is not None:
            self._channel = grpc.aio.secure_channel(self.connection.target, self.connection.credentials)
        else:
            self._channel = grpc.aio.insecure_channel(self.connection.target)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._store = adapter_store_pb2_grpc.AdapterStoreStub(self._channel)
        self.timeout_s = timeout_s
        self.retry = retry

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncGenerator[Chunk]:
        """Chunks as the server produces them. Leaving the loop early cancels the call, which frees the
        worker's resources for it within one step."""
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
                async for reply in call:
                    received += 1
                    yield Chunk.from_proto(reply)
                return
            except grpc.aio.AioRpcError as exc:
                error = OpenLoRAError.from_rpc(exc)
                delay = self.retry.delay(error, attempt, received)
                if delay is None or not deadline.allows(delay):
                    raise error from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        one_sample(options)
        request_id = options["request_id"] = options.get("request_id") or uuid.uuid4().hex
        completion = Completion(request_id)
        async for chunk in self.stream(prompt, **options):
            completion.add(chunk)
        return completion

    async def list_models(self) -> Models:
        return Models.from_proto(
            await self._call(self._inference.ListModels, inference_pb2.ListModelsRequest())
        )

    async def upload_adapter(
        self,
        source: Path,
        adapter_id: str,
        *,
        base_model: str,
        public: bool = False,
        provenance: Provenance | None = None,
        progress: Progress | None = None,
    ) -> AdapterInfo:
        header = adapters.upload_header(adapter_id, base_model, public, provenance)
        try:
            info = await upload(
                self._store,
                header,
                adapter_files(Path(source)),
                progress=progress,
                timeout=self.timeout_s,
                metadata=call_metadata(self.connection.api_key, uuid.uuid4().hex),
            )
        except grpc.aio.AioRpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
        return AdapterInfo.from_proto(info)

    async def import_adapter(
        self,
        source_uri: str,
        *,
        adapter_id: str = "",
        base_model: str = "",
        public: bool = False,
        provenance: Provenance | None = None,
    ) -> AdapterInfo:
        request = adapters.import_request(source_uri, adapter_id, base_model, public, provenance)
        return AdapterInfo.from_proto(await self._call(self._store.Import, request))

    async def get_adapter(self, adapter: str) -> AdapterInfo:
        request = store_pb.GetAdapterRequest(adapter=adapter_ref(adapter))
        return AdapterInfo.from_proto(await self._call(self._store.Get, request))

    async def list_adapters(self, *, base_model: str = "", owner: str = "") -> list[AdapterInfo]:
        found: list[AdapterInfo] = []
        token = ""
        while True:
            page = await self._call(self._store.List, adapters.list_request(base_model, owner, token))
            found += map(AdapterInfo.from_proto, page.adapters)
            if not (token := page.next_page_token):
                return found

    async def delete_adapter(self, adapter: str) -> list[str]:
        request = store_pb.DeleteAdapterRequest(adapter=adapter_ref(adapter))
        return list((await self._call(self._store.Delete, request)).deleted_versions)

    async def download_adapter(
        self, adapter: str, dest: Path, *, progress: Progress | None = None
    ) -> AdapterInfo:
        writer = DownloadWriter(Path(dest), progress)
        request = store_pb.DownloadRequest(adapter=adapter_ref(adapter))
        call = self._store.Download(
            request, metadata=call_metadata(self.connection.api_key, uuid.uuid4().hex), timeout=self.timeout_s
        )
        try:
            async for chunk in call:
                await asyncio.to_thread(writer.feed, chunk)
            return AdapterInfo.from_proto(await asyncio.to_thread(writer.finish))
        except grpc.aio.AioRpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
        except DownloadError as exc:
            raise OpenLoRAError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        finally:
            writer.close()

    async def _call(self, method: Callable[..., Awaitable[R]], request: Any) -> R:
        try:
            return await method(
                request,
                metadata=call_metadata(self.connection.api_key, uuid.uuid4().hex),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise OpenLoRAError.from_rpc(exc) from None
