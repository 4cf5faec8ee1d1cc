"""Prometheus metrics of a worker: request latencies, engine occupancy, usage spool backlog.

Latencies are histograms observed as tokens stream; occupancy and backlog are read from the engine
and the usage reporter when Prometheus scrapes (a collector), so the step loop keeps no extra state.
The adapter cache's own metrics come from `services.inference.metrics.AdapterMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.inference.engine.llm_engine import EngineStats
from services.inference.usage.reporter import UsageReporter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class WorkerMetrics(Collector):
    def __init__(
        self,
        registry: CollectorRegistry,
        engine_stats: Callable[[], EngineStats | None],
        reporter: Callable[[], UsageReporter | None],
    ) -> None:
        self.engine_stats = engine_stats
        self.reporter = reporter
        self.ttft = Histogram(
            "openlora_time_to_first_token_seconds",
            "From a Generate call's arrival to its first token, adapter load and queueing included.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "openlora_inter_token_latency_seconds",
            "Between two consecutive tokens of one stream: a chunk's gap since the previous chunk over its "
            "tokens, observed once per chunk.",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "openlora_requests",
            "Generate calls by how they ended (stop, length, cancelled, error).",
            ["outcome"],
            registry=registry,
        )
        self.tokens = Counter(
            "openlora_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"], registry=registry
        )
        # Bound once: looking a label up costs more than the increment, and these count every chunk.
        self.prompt_tokens = self.tokens.labels("prompt")
        self.completion_tokens = self.tokens.labels("completion")
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        stats = self.engine_stats()
        if stats is not None:
            yield GaugeMetricFamily(
                "openlora_queue_depth",
                "Requests waiting for admission (or for their adapter).",
                value=stats.num_waiting,
            )
            yield GaugeMetricFamily(
                "openlora_running_requests", "Requests being prefilled or decoded.", value=stats.num_running
            )
            yield GaugeMetricFamily(
                "openlora_kv_blocks_used",
                "KV-cache blocks held by requests (cached prefix blocks count as free).",
                value=stats.num_kv_blocks - stats.num_free_kv_blocks,
            )
            yield GaugeMetricFamily(
                "openlora_kv_blocks_total", "KV-cache blocks in total.", value=stats.num_kv_blocks
            )
            yield CounterMetricFamily(
                "openlora_preemptions", "Requests preempted to free KV blocks.", value=stats.num_preemptions
            )
        reporter = self.reporter()
        if reporter is None:
            return
        spool = reporter.spool
        yield GaugeMetricFamily(
            "openlora_usage_spool_backlog_batches",
            "Usage batches in the spool awaiting attribution's ack.",
            value=spool.backlog_batches,
        )
        yield GaugeMetricFamily(
            "openlora_usage_spool_backlog_bytes",
            "Usage spool bytes on disk: unacked batches, and acked ones of the segment being written.",
            value=spool.backlog_bytes,
        )
        yield GaugeMetricFamily(
            "openlora_usage_buffered_records",
            "Usage records waiting in memory for the spool (grows only while the spool is full).",
            value=reporter.stats.records_buffered,
        )
        yield CounterMetricFamily(
            "openlora_usage_spool_full",
            "Times the spool refused a batch (disk full or over budget): an alarm, usage waits in memory.",
            value=reporter.stats.spool_full_alarms,
        )
        yield CounterMetricFamily(
            "openlora_usage_reconnects",
            "Times the usage stream to attribution was reopened.",
            value=reporter.stats.reconnects,
        )
        yield GaugeMetricFamily(
            "openlora_usage_connected",
            "1 while attribution acks the usage stream.",
            value=int(reporter.stats.connected),
        )
        yield CounterMetricFamily(
            "openlora_usage_spool_damaged_frames",
            "Damaged stretches of the spool found (copied aside, logged); their batches are lost.",
            value=spool.damaged_frames,
        )
        yield CounterMetricFamily(
            "openlora_usage_dead_letter_records",
            "Usage records attribution refused, kept in the dead-letter file beside the spool (not billed).",
            value=reporter.dead_letters.records,
        )
        yield CounterMetricFamily(
            "openlora_usage_sender_errors",
            "Unexpected errors the usage sender or flusher was restarted after (see the log).",
            value=reporter.stats.send_errors + reporter.stats.flush_errors,
        )
