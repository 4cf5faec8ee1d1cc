"""`https://host/path/adapter.tar` (or a folder URL holding the two PEFT files); `http://` when enabled.

Every host, including each redirect's, passes the fetch policy: allow-list, and no private, loopback
or link-local addresses unless the operator allows them. The connection goes to the address that was
checked (`pinned_http`), never to a second DNS answer, and never through a proxy.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from services.adapter_store.bundle import ARCHIVE_SUFFIXES, refuse_pickle
from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.sources import FetchedAdapter, SourceContext, pinned_http, suggest_id
from services.adapter_store.sources.fetch_limits import write_limited
from services.adapter_store.sources.policy import FetchPolicy
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument, Unavailable


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: FetchPolicy, schemes: tuple[str, ...]) -> None:
        self.policy, self.schemes = policy, schemes

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        target = urlparse(newurl)
        if target.scheme not in self.schemes:
            raise InvalidArgument(
                "source_uri", f"redirected to a {target.scheme!r} URL, which is not allowed"
            )
        self.policy.check_host(target.hostname or "")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class WebSource:
    def fetch(self, uri: str, dest: Path, context: SourceContext) -> FetchedAdapter:
        parsed = urlparse(uri)
        context.policy.check_host(parsed.hostname or "")
        path = parsed.path.rstrip("/")
        name = path.rsplit("/", 1)[-1]
        refuse_pickle(name, "source_uri")
        opener = pinned_http.opener(context.policy, _CheckedRedirects(context.policy, (parsed.scheme,)))
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            target = dest / name
            self._download(opener, uri, target, context.policy)
            return FetchedAdapter({name: target}, suggest_id(name.split(".")[0]))
        files = {}
        for file_name in (CONFIG, WEIGHTS):
            target = dest / file_name
            self._download(opener, f"{uri.rstrip('/')}/{file_name}", target, context.policy)
            files[file_name] = target
        return FetchedAdapter(files, suggest_id(name or parsed.hostname or "imported"))

    @staticmethod
    def _download(opener: urllib.request.OpenerDirector, url: str, target: Path, policy: FetchPolicy) -> None:
        try:
            response = opener.open(url, timeout=policy.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise InvalidArgument("source_uri", f"{url} answered {exc.code}") from None
            raise Unavailable(f"fetching {url} failed: HTTP {exc.code}", retry_after_s=5) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise Unavailable(f"fetching {url} failed: {exc}", retry_after_s=5) from None
        with response:
            write_limited(_chunks(response), target, policy.max_bytes, url)


def _chunks(response: IO[bytes]) -> Iterator[bytes]:
    while block := response.read(1 << 20):
        yield block
