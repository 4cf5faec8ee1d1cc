"""The Prometheus `/metrics` HTTP endpoint a service serves next to its gRPC port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("openlora.metrics")


class MetricsEndpoint:
    """Serves `registry` on `host:port` (0 picks a free port) from a background thread until closed."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        try:
            self._http, _thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise OSError(f"metrics: cannot listen on {host}:{port}: {exc}") from exc
        self.port = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
