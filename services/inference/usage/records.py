"""The usage of one request as token ranges: one for the prompt, and one per flush for the tokens
generated since the last (a range never spans two wall-clock minutes).

Counting a chunk's tokens is an integer addition; the `TokenUsage` records are built only when the
reporter takes them (`take`, once per flush), so a request costs a record per flush, not per chunk.

`(request_id, token_index, kind)` is attribution's idempotency key, so a request's tokens are
numbered from 0 within each kind and never renumbered: a resend after a lost ack counts once. The
`request_id` there is the worker's own id for the served request (`new_usage_id`), not the client's:
clients may reuse their ids, and every token streamed must be billed, once, to whoever streamed it.
The client's id travels beside it as a label.

With a journal (`journal.py`), a request also tells it what changed in the turn it changed: a count
(the common case, a flag check per chunk) or its shape (a prompt, a new range, a take, a spool
append), and keeps the ranges it handed out until the spool confirms them.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from openlora.v1 import attribution_pb2, common_pb2

if TYPE_CHECKING:
    from services.inference.usage.journal import Range, UsageJournal

Component = tuple[str, str, float]  # adapter id, version, share of each token

_MINUTE_NS = 60 * 1_000_000_000


def new_usage_id() -> str:
    """An id unique to one served request (random: workers make them without coordinating)."""
    return uuid.uuid4().hex


class RequestUsage:
    """Counts one request's tokens as they are handed to its stream; `take` turns what was counted
    since the last take into records."""

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
        `traceparent` (the request span's W3C context) rides on the prompt record only."""
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
        self.closed = False
        """The request ended and the engine holds nothing more of it: the reporter forgets it once it
        took the rest."""
        self._close_asked = False
        self._engine_requests = 0  # started and not yet reported done by the engine
        self._prompt_ts_ns = 0  # the prompt counted, its record not taken yet
        self._ranges: list[tuple[int, int, int]] = []  # (first token, count, ts ns) not taken yet
        self._open_first = 0  # the range still growing: from this token to `completion_tokens`
        self._open_ts_ns = 0
        self._open_minute_end_ns = 0
        self._prompt_unspooled_ts_ns = 0  # the prompt's record is not in the spool yet
        self._taken: list[Range] = []  # ranges handed to the reporter, not in the spool yet
        self.journal: UsageJournal | None = None
        self.journal_slot = 0
        self.journal_counted = False

    def prompt(self, count: int) -> None:
        """Count the prompt, once: whole when its prefill produced the first token, or the part the
        engine took in before a cancellation."""
        if self.prompt_tokens or not count:
            return
        self.prompt_tokens = count
        self._prompt_ts_ns = self._prompt_unspooled_ts_ns = time.time_ns()
        if self.journal is not None:
            self.journal.reshaped(self)

    def completion(self, count: int) -> None:
        """Count the next `count` generated tokens."""
        if not count:
            return
        now_ns = time.time_ns()
        reshaped = False
        if self._open_first < self.completion_tokens and now_ns >= self._open_minute_end_ns:
            self._close_open_range()  # the ledger counts per minute: a range stays inside one
        if self._open_first == self.completion_tokens:
            self._open_ts_ns = now_ns
            self._open_minute_end_ns = (now_ns // _MINUTE_NS + 1) * _MINUTE_NS
            reshaped = True
        self.completion_tokens += count
        journal = self.journal
        if journal is not None:
            if reshaped:
                journal.reshaped(self)
            elif not self.journal_counted:
                self.journal_counted = True
                journal.counted(self)

    def hold(self) -> None:
        """An engine request of this one started: it stays open until `engine_done`."""
        self._engine_requests += 1

    def engine_done(self, prompt_tokens_taken: int) -> None:
        """The engine holds nothing more of one of its requests, which had taken in this many prompt
        tokens: counted as the prompt when no token reached the client first (a cancelled prefill
        cost the same compute as one that produced a token)."""
        self.prompt(prompt_tokens_taken)
        self._engine_requests -= 1
        if self._close_asked and not self._engine_requests:
            self.closed = True

    def close(self) -> None:
        """The request ended: closed now, or once the engine reports the last of its requests done."""
        self._close_asked = True
        if not self._engine_requests:
            self.closed = True

    @property
    def has_untaken(self) -> bool:
        return bool(self._prompt_ts_ns or self._ranges or self._open_first < self.completion_tokens)

    def take(self) -> list[attribution_pb2.TokenUsage]:
        """Records of every token counted since the last take: the prompt's, then the generated ranges."""
        records = []
        if self._prompt_ts_ns:
            record = self._record(attribution_pb2.PROMPT, 0, self.prompt_tokens, self._prompt_ts_ns)
            record.traceparent = self.traceparent
            records.append(record)
            self._prompt_ts_ns = 0
        if self._open_first < self.completion_tokens:
            self._close_open_range()
        for first, count, ts_ns in self._ranges:
            records.append(self._record(attribution_pb2.COMPLETION, first, count, ts_ns))
        if self.journal is not None:
            self._taken.extend(self._ranges)
            self.journal.reshaped(self)
        self._ranges = []
        return records

    # --- what the journal reads

    def labels(self) -> attribution_pb2.TokenUsage:
        """A record with this request's labels and no tokens."""
        record = self._record(attribution_pb2.COMPLETION, 0, 0, 0)
        record.traceparent = self.traceparent
        return record

    def shape(self) -> tuple[int, int, int, int, list[Range]]:
        """(prompt tokens not in the spool, their stamp, the growing range's first token, its stamp,
        the closed ranges not in the spool)."""
        prompt = self.prompt_tokens if self._prompt_unspooled_ts_ns else 0
        return (
            prompt,
            self._prompt_unspooled_ts_ns,
            self._open_first,
            self._open_ts_ns,
            self._taken + self._ranges,
        )

    def mark_spooled(self, record: attribution_pb2.TokenUsage) -> None:
        if record.kind == attribution_pb2.PROMPT:
            self._prompt_unspooled_ts_ns = 0
            return
        end = record.token_index + record.token_count
        self._taken = [r for r in self._taken if not record.token_index <= r[0] < end]

    @property
    def finished(self) -> bool:
        return self.closed and not self.has_untaken and not self._taken and not self._prompt_unspooled_ts_ns

    def _close_open_range(self) -> None:
        self._ranges.append((self._open_first, self.completion_tokens - self._open_first, self._open_ts_ns))
        self._open_first = self.completion_tokens

    def _record(self, kind: int, first: int, count: int, ts_ns: int) -> attribution_pb2.TokenUsage:
        record = attribution_pb2.TokenUsage(
            request_id=self.request_id,
            token_index=first,
            token_count=count,
            kind=kind,  # type: ignore[arg-type]
            adapters=self.adapters,
            tenant=self.tenant,
            worker_id=self.worker_id,
            client_request_id=self.client_request_id,
        )
        record.ts.FromNanoseconds(ts_ns)
        return record
