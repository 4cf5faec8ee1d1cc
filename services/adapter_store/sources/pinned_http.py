"""HTTP(S) for imports that connects to the very address the fetch policy checked.

urllib resolves a host when it connects; checking the host's addresses beforehand leaves a window in
which a name can re-resolve (DNS rebinding) from the public address that was checked to 127.0.0.1 or
the pod network. These handlers resolve once, inside the connection, check what they got, and connect
to it, while TLS still verifies the certificate against the host name. Redirects go through the same
connections. Proxies from the environment are never used (a proxy fetches on the store's behalf from
wherever it sits); an egress proxy the operator configured is.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.request
from typing import Any

from services.adapter_store.sources.policy import FetchPolicy


def _pinned(connection_class: type[http.client.HTTPConnection], policy: FetchPolicy) -> Any:
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        connection = connection_class(host, **kwargs)
        # http.client opens its socket through this attribute (HTTPS wraps the result in TLS for `host`).
        connection._create_connection = policy.connect  # type: ignore[attr-defined]
        return connection

    return make


class PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_pinned(http.client.HTTPConnection, self.policy), req)


class PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy) -> None:
        self.tls = ssl.create_default_context()  # verifies the certificate against the URL's host
        super().__init__(context=self.tls)
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_pinned(http.client.HTTPSConnection, self.policy), req, context=self.tls)


def opener(policy: FetchPolicy, *extra: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """An opener whose every connection is checked and pinned by `policy`, through the operator's
    proxy when one is configured and never through the environment's."""
    proxies = {"http": policy.proxy_url, "https": policy.proxy_url} if policy.proxy_url else {}
    return urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), PinnedHTTPHandler(policy), PinnedHTTPSHandler(policy), *extra
    )
