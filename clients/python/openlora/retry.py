"""When a failed generation may be sent again: only `UNAVAILABLE`, only before its first chunk."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from openlora.errors import OpenLoRAError


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    """Calls in all, the first included."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, error: OpenLoRAError, attempt: int, chunks_received: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the error must reach the caller.

        A stream that already delivered tokens is never retried: the caller would see them twice."""
        if error.code != grpc.StatusCode.UNAVAILABLE or chunks_received or attempt >= self.attempts:
            return None
        backoff = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** (attempt - 1))
        return max(backoff, error.retry_after_s or 0.0)


DEFAULT_RETRY = RetryPolicy()
