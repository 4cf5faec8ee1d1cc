"""Blob backends: a key/value store of immutable objects, on S3 or in a local directory.

The store keeps everything in one backend: content-addressed weights, JSON manifests and reference
markers. Writes of one object are atomic on both backends (S3 PUT; temp file + rename locally), so a
reader never sees half a manifest. Keys use '/' as the separator on both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from services.common.errors import Unavailable


class BlobBackend(Protocol):
    name: str

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; KeyError when it does not exist."""
        ...

    def iter_chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]:
        """The object's bytes in chunks of at most chunk_bytes; KeyError when it does not exist."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object; no error when it does not exist."""
        ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under prefix, in lexicographic order."""
        ...

    def list_children(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Names of the direct children of prefix (which ends with '/'), sorted, after start_after."""
        ...


class LocalBlobs:
    """Objects as files under a root directory (the embedded default)."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:  # keys are built by the store; this is a backstop
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def _atomic_write(self, key: str, write: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(out: Any) -> None:
            with open(path, "rb") as src:
                while block := src.read(1024 * 1024):
                    out.write(block)

        self._atomic_write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def iter_chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]:
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError:
            raise KeyError(key) from None
        return _read_chunks(src, chunk_bytes)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Drop emptied directories so listings stay small.
        for parent in path.parents:
            if parent == self.root.resolve():
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list_keys(self, prefix: str) -> Iterator[str]:
        found = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    found.append(key)
        yield from sorted(found)

    def list_children(self, prefix: str, start_after: str = "") -> Iterator[str]:
        directory = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not directory.is_dir():
            return
        for name in sorted(os.listdir(directory)):
            if not name.startswith(".tmp-") and name > start_after:
                yield name


def _read_chunks(src: Any, chunk_bytes: int) -> Iterator[bytes]:
    with src:
        while block := src.read(chunk_bytes):
            yield block


class S3Blobs:
    """Objects in an S3 bucket via boto3 (AWS, MinIO, SeaweedFS)."""

    name = "s3"

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    @classmethod
    def from_settings(cls, settings: Any) -> S3Blobs:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(
                s3={"addressing_style": settings.s3_addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
            ),
        )
        blobs = cls(client, settings.s3_bucket, settings.s3_prefix)
        blobs.ensure_bucket()
        return blobs

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(kwargs.get("Key", "")) from None
            if code in ("SlowDown", "ServiceUnavailable", "503", "InternalError", "500"):
                raise Unavailable(f"blob storage unavailable: {code}", retry_after_s=1.0) from exc
            raise
        except BotoCoreError as exc:  # connection refused, timeouts, ...
            raise Unavailable(f"blob storage unreachable: {exc}", retry_after_s=1.0) from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call("head_bucket", Bucket=self.bucket)
        except (ClientError, KeyError):
            self._call("create_bucket", Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call("put_object", Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def put_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # upload_file goes multipart above its threshold, streaming from disk
            self.client.upload_file(str(path), self.bucket, self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(f"blob storage write failed: {exc}", retry_after_s=1.0) from exc

    def get_bytes(self, key: str) -> bytes:
        body = self._call("get_object", Bucket=self.bucket, Key=self.prefix + key)["Body"]
        with body:
            return bytes(body.read())

    def iter_chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]:
        body = self._call("get_object", Bucket=self.bucket, Key=self.prefix + key)["Body"]
        return _body_chunks(body, chunk_bytes)

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", Bucket=self.bucket, Key=self.prefix + key)
        except KeyError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self.prefix + key)

    def list_keys(self, prefix: str) -> Iterator[str]:
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=self.prefix + prefix, **token)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_children(self, prefix: str, start_after: str = "") -> Iterator[str]:
        full = self.prefix + prefix
        extra: dict[str, str] = {"StartAfter": full + start_after} if start_after else {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=full, Delimiter="/", **extra)
            names = [p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            names += [o["Key"][len(full) :] for o in page.get("Contents", [])]
            yield from sorted(n for n in names if n > start_after)
            if not page.get("IsTruncated"):
                return
            extra = {"ContinuationToken": page["NextContinuationToken"]}


def _body_chunks(body: Any, chunk_bytes: int) -> Iterator[bytes]:
    with body:
        yield from body.iter_chunks(chunk_bytes)
