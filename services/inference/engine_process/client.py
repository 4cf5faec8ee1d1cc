"""The front's engine over a supervised engine process: `async for out in client.generate(...)`, or
`client.open(..., on_news=callback)` for a consumer called back inside the step handler.

Commands are batched: every request and abort of one event-loop turn leaves in one message.
Each step message is spread over the streams it names: a stream's new tokens are appended to its
buffer, and the consumer takes everything buffered since it last looked. A consumer is woken at once
for its first tokens, its end or an error, but otherwise at most once per `stream_interval_s`: on a
small model the engine steps every few milliseconds, and every chunk costs the front, the gateway
and the client far more CPU than a token does, so chunks carry several tokens each while the time to
first token stays what the engine makes it. A consumer that does not keep up lets its
buffer grow to `max_buffered_tokens`; past that, its request is aborted and the stream fails with
RESOURCE_EXHAUSTED, so one slow client costs neither the step loop's time nor unbounded memory.

A consumer may also ask to hear when the engine holds nothing more of its request (`on_end`), with
how many prompt tokens the engine took in: a request cancelled before its first token reached the
client still cost its prefill, and the engine's answer to the abort says how much of it was done.

If the engine process exits, every stream fails at once (`EngineUnavailable`), `on_down` tells the
worker (health NOT_SERVING) and a fresh engine is started with backoff; `on_up` reports it ready.
Crashing more than `max_restarts` times within `restart_window_s` is fatal (`on_fatal`): a worker
that cannot keep an engine up should leave the pool and let its orchestrator decide.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument, ResourceExhausted
from services.inference.engine.llm_engine import EngineStats
from services.inference.engine.sequence import FinishReason, SamplingParams, TopLogprobs
from services.inference.engine_process import protocol
from services.inference.engine_process.core import EngineSpec
from services.inference.engine_process.process import EngineProcess
from services.inference.engine_process.protocol import AdapterHandle, EngineInfo, NewRequest, SlotState

log = logging.getLogger("openlora.worker.engine")


class EngineUnavailable(RuntimeError):
    """The engine process is gone or restarting: retry, here or on another worker."""


@dataclass(frozen=True)
class EngineOutput:
    """Everything a request got since its consumer last looked; the last one has `finish_reason`."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineStream:
    """One request's output as the engine produces it, for one consumer.

    A consumer either awaits `news` (`EngineClient.generate` does) or is called back: `on_news` runs
    inside the step handler as soon as there is something to `take`, so a front can turn every
    stream's tokens into chunks in one pass over the step, with no task woken per stream. Either way
    `waiting` says the consumer would take news now; while it is false (a chunk of its own is still
    being written) tokens gather here, up to the client's `max_buffered_tokens`."""

    __slots__ = (
        "_client",
        "_generation",
        "_notify",
        "_on_end",
        "due",
        "error",
        "finish",
        "logprobs",
        "news",
        "prompt_tokens",
        "prompt_tokens_taken",
        "request_id",
        "timer",
        "tokens",
        "top_logprobs",
        "waiting",
    )

    def __init__(
        self,
        client: EngineClient,
        request_id: str,
        on_news: Callable[[], None] | None = None,
        *,
        prompt_tokens: int = 0,
        on_end: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._generation = client._generation
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.prompt_tokens_taken = 0  # of an aborted request, as far as the front saw: its tokens came
        self._on_end = on_end
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs] = []
        self.finish: FinishReason | None = None
        self.error: BaseException | None = None
        self.news = asyncio.Event()
        self._notify = on_news if on_news is not None else self.news.set
        self.due = 0.0  # loop time from which new tokens wake the consumer: the first ones at once
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = False  # the consumer takes news now: tokens held back are ours, not its

    def take(self) -> EngineOutput:
        """Everything since the last take; raises the stream's error (the engine failed, the request
        was refused or cancelled for a slow reader)."""
        self.news.clear()
        if self.error is not None:
            raise self.error
        out = EngineOutput(self.tokens, self.logprobs, self.finish, self.top_logprobs)
        self.tokens, self.logprobs = [], []
        if self.top_logprobs:
            self.top_logprobs = []
        if out.token_ids or out.finish_reason is not None:
            self.due = asyncio.get_running_loop().time() + self._client.stream_interval_s
        return out

    async def outputs(self) -> AsyncIterator[EngineOutput]:
        """What the consumer takes, as it comes, until the request finishes (raises its error)."""
        while True:
            self.waiting = True
            await self.news.wait()
            self.waiting = False
            out = self.take()
            if out.token_ids or out.finished:
                yield out
            if out.finished:
                return

    def end(self, prompt_tokens_taken: int) -> None:
        """The engine holds nothing more of this request: tell the consumer, once."""
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(prompt_tokens_taken)

    def close(self) -> None:
        """The consumer is done: a request still running is aborted in the engine."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._client._closed(self)

    def wake(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._notify()

    def _timer_fired(self) -> None:
        self.timer = None
        self._notify()

    def wake_by(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """New tokens: wake the consumer now if it is due, else once it is."""
        if now >= self.due:
            self.wake()
        elif self.timer is None:
            self.timer = loop.call_at(self.due, self._timer_fired)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: tuple[float, float] = (0.5, 10.0)  # first wait, longest wait
    start_timeout_s: float = 600.0  # loading a large model from a slow disk takes minutes
    stop_timeout_s: float = 10.0


class EngineClient:
    def __init__(
        self,
        spec: Callable[[str, str], EngineSpec],
        *,
        env: dict[str, str],
        max_buffered_tokens: int = 4096,
        stream_interval_s: float = 0.0,
        policy: RestartPolicy | None = None,
        on_down: Callable[[str], object] | None = None,
        on_up: Callable[[EngineInfo], object] | None = None,
        on_fatal: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._spec = spec
        self._env = env
        self.max_buffered_tokens = max_buffered_tokens
        self.stream_interval_s = stream_interval_s
        self.policy = policy or RestartPolicy()
        self._on_down = on_down
        self._on_up = on_up
        self._on_fatal = on_fatal
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="openlora-engine-"))
        self._process: EngineProcess | None = None
        self._generation = 0
        self._ready: asyncio.Future[EngineInfo] | None = None
        self._streams: dict[str, EngineStream] = {}
        self._aborting: dict[str, EngineStream] = {}  # aborts sent, the engine's answers not in yet
        self._adds: list[list[Any]] = []
        self._aborts: list[str] = []
        self._flush_scheduled = False
        self._crashes: deque[float] = deque()
        self._restart: asyncio.Task[None] | None = None
        self._stopping = False
        self.info: EngineInfo | None = None
        self.last_failure: str | None = None
        """Why the last engine process ended, as it said (or its exit status)."""
        self.restarts = 0
        self._stats: EngineStats | None = None
        self.slots = SlotState()
        """The engine's LoRA slots as last reported (a `SlotTable`'s read-only questions)."""

    # lifecycle

    @property
    def alive(self) -> bool:
        """An engine process is up and takes requests."""
        return self.info is not None and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self.info is not None else None

    async def start(self) -> EngineInfo:
        """Start the first engine and wait until its model is loaded; raises if it cannot start."""
        return await self._start_engine()

    async def _start_engine(self) -> EngineInfo:
        self._generation += 1
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._process = EngineProcess(
            self._spec,
            self._runtime_dir,
            self._generation,
            env=self._env,
            on_message=self._on_message,
            on_exit=self._exited,
        )
        self._process.start()
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), self.policy.start_timeout_s)
        except TimeoutError:
            self._process.kill()
            raise RuntimeError(
                f"the engine process did not load its model within {self.policy.start_timeout_s:.0f}s"
            ) from None
        self.info = info
        return info

    async def stop(self) -> None:
        """Stop the engine (unfinished streams fail) and remove the runtime directory."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
        self._fail_streams(EngineUnavailable("the worker is shutting down"))
        if self._process is not None:
            await self._process.stop(self.policy.stop_timeout_s)
        self.info = None
        shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the engine process (tests and operators' last resort); it is restarted."""
        if self._process is not None:
            self._process.kill()

    def stats(self) -> EngineStats | None:
        """The engine's occupancy as last reported (at most a few hundred milliseconds old)."""
        return self._stats

    # requests

    def open(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        adapter: AdapterHandle | None = None,
        on_news: Callable[[], None] | None = None,
        after: str | None = None,
        on_end: Callable[[int], None] | None = None,
    ) -> EngineStream:
        """Start a request; its output gathers in the returned stream (see `EngineStream`), which
        the caller must `close`. A refusal comes as the stream's error. `after` names a request with
        the same prompt whose cached prefill this one reuses (another sample of it).

        `on_end(prompt_tokens_taken)` is called once, after `close`, when the engine holds nothing
        more of the request: at once for one that finished (its whole prompt) or was refused or
        lost with its engine (0), and for one still running when the engine answers its abort (the
        prompt tokens it had computed or found cached)."""
        if not self.alive:
            raise EngineUnavailable(self._why_not_alive())
        if request_id in self._streams or request_id in self._aborting:
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        stream = EngineStream(self, request_id, on_news, prompt_tokens=len(prompt_token_ids), on_end=on_end)
        self._streams[request_id] = stream
        self._queue(add=NewRequest(request_id, prompt_token_ids, sampling, adapter, after).encode())
        return stream

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        adapter: AdapterHandle | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream a request's tokens, coalesced; refused requests raise before any output."""
        stream = self.open(request_id, prompt_token_ids, sampling, adapter=adapter)
        try:
            async for out in stream.outputs():
                yield out
        finally:
            stream.close()

    def _closed(self, stream: EngineStream) -> None:
        # A stream that ended, was refused, failed or was cancelled left `_streams` when it did:
        # only one still running there is aborted.
        request_id = stream.request_id
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]
            if stream._generation == self._generation and self.alive:
                self._abort(stream)
                return
        if self._aborting.get(request_id) is stream:
            return  # the engine's answer ends it
        stream.end(stream.prompt_tokens if stream.finish is not None else 0)

    def _abort(self, stream: EngineStream) -> None:
        self._aborting[stream.request_id] = stream
        self._queue(abort=stream.request_id)

    def _why_not_alive(self) -> str:
        if self._stopping:
            return "the worker is shutting down"
        if self.last_failure is not None:
            return f"the engine is restarting after a failure ({self.last_failure})"
        return "the engine is not running"

    def _queue(self, *, add: list[Any] | None = None, abort: str | None = None) -> None:
        if add is not None:
            self._adds.append(add)
        if abort is not None:
            self._aborts.append(abort)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        adds, aborts = self._adds, self._aborts
        self._adds, self._aborts = [], []
        if self._process is not None and (adds or aborts):
            self._process.send([protocol.COMMANDS, adds, aborts])

    # messages from the engine (event loop)

    def _on_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == protocol.STEP:
            self._on_step(message[1], message[2], message[3])
        elif kind == protocol.ABORTED:
            aborting = self._aborting
            for request_id, taken in message[1]:
                stream = aborting.pop(request_id, None)
                if stream is not None:
                    stream.end(max(taken, stream.prompt_tokens_taken))
        elif kind == protocol.REFUSED:
            _, request_id, field, problem = message
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.error = InvalidArgument(field or "request", problem)
                stream.wake()
        elif kind == protocol.READY:
            info = EngineInfo.decode(message[1])
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(info)
        elif kind == protocol.FAILED:
            self.last_failure = str(message[1])
            log.error("the engine process failed: %s", self.last_failure)
        else:
            log.error("unknown message from the engine process: %r", kind)

    def _on_step(self, outputs: list[list[Any]], stats: list[Any] | None, slots: list[Any] | None) -> None:
        streams = self._streams
        limit = self.max_buffered_tokens
        loop = asyncio.get_running_loop()
        now = loop.time()
        for request_id, token_ids, logprobs, finish, *top in outputs:
            stream = streams.get(request_id)
            if stream is None:
                # Its consumer left and the abort is on its way, which may find the request over:
                # tokens mean the engine took in the whole prompt.
                if token_ids and (leaving := self._aborting.get(request_id)) is not None:
                    leaving.prompt_tokens_taken = leaving.prompt_tokens
                continue
            stream.tokens += token_ids
            if logprobs:
                stream.logprobs += logprobs
            if top:
                stream.top_logprobs += [(ids, values) for ids, values in top[0]]
            if finish:
                stream.finish = protocol.finish_reason(finish)
                del streams[request_id]
                stream.wake()
            elif len(stream.tokens) > limit and stream.waiting:
                stream.wake()  # held back by the stream interval, not by the reader: send them now
            elif len(stream.tokens) > limit:
                del streams[request_id]
                stream.prompt_tokens_taken = stream.prompt_tokens
                self._abort(stream)
                stream.error = ResourceExhausted(
                    f"the client read too slowly: {len(stream.tokens)} generated tokens were waiting to be "
                    f"sent (the limit is {limit}), so the request was cancelled"
                )
                stream.wake()
            elif token_ids:
                stream.wake_by(loop, now)
        if stats is not None:
            self._stats = protocol.decode_stats(stats)
        if slots is not None:
            self.slots = SlotState.decode(slots)

    def _fail_streams(self, error: EngineUnavailable) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.error = EngineUnavailable(str(error))  # one object per consumer: tracebacks stay apart
            stream.wake()
        aborting, self._aborting = self._aborting, {}
        for stream in aborting.values():
            stream.end(stream.prompt_tokens_taken)  # no answer will come: what the front saw
        self._adds.clear()
        self._aborts.clear()

    # supervision

    def _exited(self, process: EngineProcess, code: int) -> None:
        if process is not self._process or self._stopping:
            return
        reason = process.failure or f"exit status {code}"
        self.last_failure = reason
        was_ready = self.info is not None
        self.info = None
        self._stats = None
        self.slots = SlotState()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the engine process ended while loading: {reason}"))
        if not was_ready:
            return  # a start that failed: whoever awaits it decides
        log.critical(
            "the engine process %s ended (%s); failing its requests and restarting it", process.pid, reason
        )
        self._fail_streams(EngineUnavailable(f"this worker's engine failed ({reason})"))
        if self._on_down is not None:
            self._on_down(reason)
        self._restart = asyncio.get_running_loop().create_task(self._supervise(), name="engine-restart")

    async def _supervise(self) -> None:
        backoff, longest = self.policy.backoff_s
        while not self._stopping:
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes and now - self._crashes[0] > self.policy.window_s:
                self._crashes.popleft()
            if len(self._crashes) > self.policy.max_restarts:
                error = RuntimeError(
                    f"the engine process failed {len(self._crashes)} times within "
                    f"{self.policy.window_s:.0f}s (last: {self.last_failure}); giving up"
                )
                log.critical("%s", error)
                if self._on_fatal is not None:
                    self._on_fatal(error)
                return
            await asyncio.sleep(backoff)
            try:
                info = await self._start_engine()
            except Exception as exc:
                log.error("restarting the engine failed: %s", exc)
                self.last_failure = str(exc)
                backoff = min(backoff * 2, longest)
                continue
            self.restarts += 1
            log.warning("the engine process is back (pid %d, restart %d)", info.pid, self.restarts)
            if self._on_up is not None:
                self._on_up(info)
            return
