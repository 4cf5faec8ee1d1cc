"""An asyncio front for the engine: `async for out in engine.generate(...)`, steps on their own thread.

The engine is not thread-safe, so every change to it (a new request, a cancellation) is queued as a
command and applied by the step thread between two steps; outputs travel back to each consumer's
event loop with `call_soon_threadsafe`. A consumer that stops iterating (it broke out, was cancelled,
or its client hung up) queues an abort, so the request's KV blocks are free before the next step.

No single request may take the loop down: a command that raises fails its own request only. A failed
`engine.step()` is another matter: the engine's state can no longer be trusted, so the loop ends,
every stream fails, and `on_failure` tells the owner (on the step thread) to stop serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from services.inference.engine.llm_engine import LLMEngine, StepOutput
from services.inference.engine.sequence import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepOutput | BaseException]
    abandoned: bool = False
    """Set by the consumer when it leaves; the step thread then never takes the request in."""

    def put(self, item: StepOutput | BaseException) -> None:
        # A closed loop means the consumer is gone: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class _Command:
    apply: Callable[[], None]
    request_id: str
    stream: _Stream


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        idle_wait_s: float = 0.5,
        on_failure: Callable[[BaseException], object] | None = None,
    ) -> None:
        """`on_failure` is called once, from the step thread, if the step loop dies."""
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._on_failure = on_failure
        self._commands: deque[_Command] = deque()
        # Guards `_closed` against `_submit`: a command queued after the last drain would never run.
        self._lock = threading.Lock()
        self._closed = False
        self._wakeup = threading.Event()
        self._stopping = False
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self.steps = 0
        """Steps run so far (read from other threads for metrics and tests only)."""
        self.failure: BaseException | None = None
        """What killed the step loop, if it died."""

    @property
    def alive(self) -> bool:
        """The step loop runs and takes requests."""
        return self._thread.is_alive() and not self._closed and not self._stopping

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the step thread; unfinished streams end with a cancellation."""
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> AsyncEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self) -> None:
        """Tell an idle step loop that something changed outside it (an adapter became resident)."""
        self._wakeup.set()

    def _submit(self, command: _Command) -> bool:
        """Queue a command; False once the loop has ended (it would never run)."""
        with self._lock:
            if self._closed:
                return False
            self._commands.append(command)
        self._wakeup.set()
        return True

    def _not_running(self) -> RuntimeError:
        if self.failure is not None:
            return RuntimeError(f"the engine failed: {self.failure!r}")
        return RuntimeError("the engine is not running")

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        adapter_key: str | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's tokens; the last output carries `finish_reason`.

        Invalid requests raise `InvalidArgument` here, before anything is streamed; a stopped or failed
        engine raises `RuntimeError`.
        """
        if not self.alive:
            raise self._not_running()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> None:
            if stream.abandoned:
                return
            try:
                self.engine.add_request(request_id, prompt_token_ids, sampling, adapter_key=adapter_key)
            except Exception as exc:
                stream.put(exc)  # refused (InvalidArgument): the consumer raises it before any token
                return
            self._streams[request_id] = stream

        if not self._submit(_Command(add, request_id, stream)):
            raise self._not_running()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                stream.abandoned = True
                # Queued behind the add (the deque is FIFO), so it finds the request if it was taken in.
                self._submit(_Command(lambda: self._abort(request_id, stream), request_id, stream))

    def _abort(self, request_id: str, stream: _Stream) -> None:
        # Only our own request: a refused duplicate must not cancel the request that holds the id.
        if self._streams.get(request_id) is not stream:
            return
        del self._streams[request_id]
        out = self.engine.abort(request_id)
        if out is not None:
            stream.put(out)

    def _apply(self, command: _Command) -> None:
        try:
            command.apply()
        except Exception as exc:
            log.exception("engine command for request %s failed; failing that request", command.request_id)
            self._fail(command.request_id, command.stream, exc)

    def _fail(self, request_id: str, stream: _Stream, exc: BaseException) -> None:
        if self._streams.get(request_id) is stream:
            del self._streams[request_id]
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("aborting request %s failed", request_id)
        stream.put(exc)

    def _drain(self) -> list[_Command]:
        with self._lock:
            self._closed = True
            commands = list(self._commands)
            self._commands.clear()
        return commands

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._die(exc)
            return
        # Requests submitted while stopping are taken in, then cancelled with the rest.
        for command in self._drain():
            self._apply(command)
        for request_id, stream in list(self._streams.items()):
            self._apply(_Command(functools.partial(self._abort, request_id, stream), request_id, stream))

    def _loop(self) -> None:
        while not self._stopping:
            # Cleared before looking at the state, so a wake-up that arrives meanwhile is not lost.
            self._wakeup.clear()
            while self._commands:
                self._apply(self._commands.popleft())
            if not self.engine.has_unfinished():
                self._wakeup.wait(self._idle_wait_s)
                continue
            outputs = self.engine.step()
            if self.engine.last_step_tokens == 0:
                # Every request waits for an adapter: sleep until woken rather than spin.
                self._wakeup.wait(self._idle_wait_s)
                continue
            self.steps += 1
            self._deliver(outputs)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _die(self, exc: BaseException) -> None:
        log.critical("the engine's step loop failed; failing every request", exc_info=exc)
        self.failure = exc
        # Requests still queued were never taken in: nothing to abort, only their consumers to tell.
        streams = [c.stream for c in self._drain()]
        for request_id in self._streams:
            with contextlib.suppress(Exception):  # frees what it can; the engine is not used again
                self.engine.abort(request_id)
        streams += self._streams.values()
        self._streams.clear()
        for stream in streams:
            # One exception object per consumer: raising a shared one in many tasks tangles tracebacks.
            stream.put(RuntimeError(f"engine step failed: {exc!r}"))
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:
                log.exception("the engine's failure callback raised")
