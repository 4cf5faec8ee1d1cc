"""`s3://bucket/prefix`: the two PEFT files under a prefix, or `s3://bucket/key.tar`.

Only buckets the operator listed (`import_s3_buckets`), read with the credentials configured for
import sources (`import_s3_*`), never the store's own: a tenant must not be able to import from the
store's bucket, or from any other bucket the store's identity may read.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.adapter_store.bundle import ARCHIVE_SUFFIXES, refuse_pickle
from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.sources import FetchedAdapter, SourceContext, suggest_id
from services.adapter_store.sources.fetch_limits import write_limited
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument, Unavailable


class S3Source:
    def fetch(self, uri: str, dest: Path, context: SourceContext) -> FetchedAdapter:
        parsed = urlparse(uri)
        bucket, key = parsed.netloc, parsed.path.strip("/")
        if not bucket:
            raise InvalidArgument("source_uri", "s3:// URIs need a bucket: s3://bucket/prefix")
        if context.s3_client_factory is None or not context.s3_buckets:
            raise InvalidArgument(
                "source_uri", "s3 imports are not configured on this store (import_s3_buckets is empty)"
            )
        if not any(fnmatch.fnmatchcase(bucket, pattern) for pattern in context.s3_buckets):
            raise InvalidArgument("source_uri", f"bucket {bucket!r} is not one s3 imports may read")
        client = context.s3_client_factory()  # type: ignore[operator]
        name = key.rsplit("/", 1)[-1]
        refuse_pickle(name, "source_uri")
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            target = dest / name
            self._get(client, bucket, key, target, context)
            return FetchedAdapter({name: target}, suggest_id(key.split(".")[0]))
        files = {}
        for file_name in (CONFIG, WEIGHTS):
            target = dest / file_name
            self._get(client, bucket, f"{key}/{file_name}" if key else file_name, target, context)
            files[file_name] = target
        return FetchedAdapter(files, suggest_id(key or bucket))

    @staticmethod
    def _get(client: Any, bucket: str, key: str, target: Path, context: SourceContext) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            with body:
                write_limited(
                    body.iter_chunks(1 << 20), target, context.policy.max_bytes, f"s3://{bucket}/{key}"
                )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                raise InvalidArgument("source_uri", f"s3://{bucket}/{key}: {code}") from None
            raise Unavailable(f"s3://{bucket}/{key}: {code}", retry_after_s=5) from None
        except BotoCoreError as exc:
            raise Unavailable(f"s3://{bucket}/{key}: {exc}", retry_after_s=5) from None
