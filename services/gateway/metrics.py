"""Prometheus metrics of the gateway: requests by tenant and status, routing decisions, worker load.

Worker load and health are read from the pool when Prometheus scrapes (a collector), so the request
path only bumps counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gateway.membership import WorkerEndpoint

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, endpoints: Callable[[], list[WorkerEndpoint]]) -> None:
        self.endpoints = endpoints
        self.requests = Counter(
            "openlora_gateway_requests",
            "Calls by tenant (`-` before authentication), method and final status code.",
            ["tenant", "method", "code"],
            registry=registry,
        )
        self.routing = Counter(
            "openlora_gateway_routing_decisions",
            "Generate routing: `affinity` (the adapter's first worker), `spill` (bounded load moved it "
            "to a later one), `least_loaded` (base model).",
            ["decision"],
            registry=registry,
        )
        self.retries = Counter(
            "openlora_gateway_retries",
            "Generate attempts moved to another worker after a failure before the first chunk.",
            registry=registry,
        )
        self.broken_streams = Counter(
            "openlora_gateway_broken_streams",
            "Streams that failed after their first chunk (the client got UNAVAILABLE).",
            registry=registry,
        )
        self.tokens = Counter(
            "openlora_gateway_tokens",
            "Tokens relayed, by tenant and kind.",
            ["tenant", "kind"],
            registry=registry,
        )
        self.ttft = Histogram(
            "openlora_gateway_time_to_first_token_seconds",
            "From routing a Generate call to relaying its first chunk (retries included).",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self._token_counters: dict[str, tuple[Counter, Counter]] = {}
        registry.register(self)

    def token_counters(self, tenant: str) -> tuple[Counter, Counter]:
        """The tenant's (completion, prompt) token counters: looked up once, bumped per chunk."""
        counters = self._token_counters.get(tenant)
        if counters is None:
            counters = self._token_counters[tenant] = (
                self.tokens.labels(tenant, "completion"),
                self.tokens.labels(tenant, "prompt"),
            )
        return counters

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "openlora_gateway_worker_in_flight", "Generate streams open to each worker.", labels=["worker"]
        )
        healthy = GaugeMetricFamily(
            "openlora_gateway_worker_healthy", "1 while a worker is in rotation, else 0.", labels=["worker"]
        )
        for endpoint in self.endpoints():
            in_flight.add_metric([endpoint.address], endpoint.in_flight)
            healthy.add_metric([endpoint.address], 1 if endpoint.healthy else 0)
        yield in_flight
        yield healthy
