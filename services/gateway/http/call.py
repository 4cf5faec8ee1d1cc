"""An HTTP request seen as the gateway's services see a gRPC call: its metadata and its time left.

The gateway's Generate path (authentication, limits, routing, relay) reads both from a gRPC
context; this gives it the same answers for an HTTP request, so that path is written once.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers

# Headers the Generate path reads: the API key and the W3C trace context it forwards.
_FORWARDED = ("authorization", "traceparent", "tracestate", "baggage")


class HttpCall:
    def __init__(self, headers: Headers, timeout_s: float | None, method_label: str = "http") -> None:
        self.method_label = method_label  # the route, in the gateway's per-method metrics
        self._metadata = tuple((name, headers[name]) for name in _FORWARDED if name in headers)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def code(self) -> None:
        """No gRPC status: an HTTP request is never aborted through a context."""
        return None
