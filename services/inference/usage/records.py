"""The `TokenUsage` records of one request: token ranges, one for the prompt and one per step's
generated tokens (the reporter joins a request's consecutive ranges into one per flush).

`(request_id, token_index, kind)` is attribution's idempotency key, so a request's tokens are
numbered from 0 within each kind and never renumbered: a resend after a lost ack counts once. The
`request_id` there is the worker's own id for the served request (`new_usage_id`), not the client's:
clients may reuse their ids, and every token streamed must be billed, once, to whoever streamed it.
The client's id travels beside it as a label.
"""

from __future__ import annotations

import time
import uuid

from google.protobuf import timestamp_pb2

from services.common.proto import attribution_pb2, common_pb2

Component = tuple[str, str, float]  # adapter id, version, share of each token


def new_usage_id() -> str:
    """An id unique to one served request (random: workers make them without coordinating)."""
    return uuid.uuid4().hex


class RequestUsage:
    """Counts one request's tokens and builds their records as they are produced."""

    def __init__(
        self,
        request_id: str,
        tenant: str,
        worker_id: str,
        components: tuple[Component, ...],
        traceparent: str = "",
        client_request_id: str = "",
    ) -> None:
        """`request_id` is the usage id (unique per served request), `client_request_id` the label.
        `traceparent` (the request span's W3C context) rides on the first prompt record only."""
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.traceparent = traceparent
        self.tenant = tenant
        self.worker_id = worker_id
        self.adapters = [
            attribution_pb2.WeightedAdapter(adapter=common_pb2.AdapterRef(id=i, version=v), weight=w)
            for i, v, w in components
        ]
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def prompt(self, count: int) -> list[attribution_pb2.TokenUsage]:
        """The record of the whole prompt (once: when its prefill produced the first token)."""
        if self.prompt_tokens or not count:
            return []
        self.prompt_tokens = count
        record = self._record(attribution_pb2.PROMPT, 0, count)
        record.traceparent = self.traceparent
        return [record]

    def completion(self, count: int) -> list[attribution_pb2.TokenUsage]:
        """The record of the next `count` generated tokens."""
        if not count:
            return []
        first = self.completion_tokens
        self.completion_tokens += count
        return [self._record(attribution_pb2.COMPLETION, first, count)]

    def _record(self, kind: int, first: int, count: int) -> attribution_pb2.TokenUsage:
        now = timestamp_pb2.Timestamp()
        now.FromNanoseconds(time.time_ns())
        return attribution_pb2.TokenUsage(
            request_id=self.request_id,
            token_index=first,
            token_count=count,
            kind=kind,  # type: ignore[arg-type]
            adapters=self.adapters,
            tenant=self.tenant,
            worker_id=self.worker_id,
            ts=now,
            client_request_id=self.client_request_id,
        )
