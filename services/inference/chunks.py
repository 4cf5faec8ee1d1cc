"""A request's chunks, and where they go: the transport's sink, one shared by several samples, or a queue.

`WorkerService.serve` hands chunks to a `ChunkSink` from inside the engine client's step handler, one
at a time, each once the previous was written. With n samples every sample's pusher shares the
stream's one sink; `generate` (a worker's own Generate call) reads them from a queue instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.inference.engine.sequence import FinishReason

Alternatives = tuple[list[int], list[float], list[bytes]]
"""The most likely tokens at one position: ids, log-probabilities and bytes, most likely first."""


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # usage, on the last chunk
    completion_tokens: int = 0
    top_logprobs: list[Alternatives] = field(default_factory=list)  # when asked: per token
    token_bytes: list[bytes] = field(default_factory=list)  # with logprobs: each token's own bytes
    index: int = 0  # the sample (n > 1)
    last: bool = False  # the request's last chunk: it carries the usage of every sample


class ChunkSink(Protocol):
    """Where `WorkerService.serve` hands a request's chunks (the relay's stream to the gateway)."""

    @property
    def writable(self) -> bool:
        """The previous chunk was written: the next may be sent."""

    def send(self, chunk: Chunk) -> None:
        """Queue the chunk for the transport (billed: it is sent even if the call ends now)."""

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the chunk last sent was written."""


class SharedSink:
    """One stream's sink shared by several samples' pushers: one chunk at a time, and each pusher
    waiting for the sink is called back in turn (the real sink holds one callback)."""

    __slots__ = ("_sink", "_waiting")

    def __init__(self, sink: ChunkSink) -> None:
        self._sink = sink
        self._waiting: list[Callable[[], None]] = []

    @property
    def writable(self) -> bool:
        return self._sink.writable

    def send(self, chunk: Chunk) -> None:
        self._sink.send(chunk)

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._waiting.append(callback)
        if len(self._waiting) == 1:
            self._sink.on_writable(self._written)

    def _written(self) -> None:
        waiting, self._waiting = self._waiting, []
        for callback in waiting:
            if not self._sink.writable:  # an earlier one sent a chunk: the rest wait for it
                self.on_writable(callback)
            else:
                callback()


class QueueSink:
    """`serve`'s chunks into a queue, for `generate`'s readers (no transport to wait for)."""

    writable = True

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Chunk | None] = asyncio.Queue()

    def send(self, chunk: Chunk) -> None:
        self.queue.put_nowait(chunk)

    def on_writable(self, callback: Callable[[], None]) -> None:
        callback()
