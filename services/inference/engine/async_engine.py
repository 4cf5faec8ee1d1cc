"""An asyncio front for the engine: `async for out in engine.generate(...)`, steps on their own thread.

The engine is not thread-safe, so every change to it (a new request, a cancellation) is queued as a
command and applied by the step thread between two steps; outputs travel back to each consumer's
event loop with `call_soon_threadsafe`. A consumer that stops iterating (it broke out, was cancelled,
or its client hung up) queues an abort, so the request's KV blocks are free before the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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

    def put(self, item: StepOutput | BaseException) -> None:
        # A closed loop means the consumer is gone: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._commands: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self.steps = 0
        """Steps run so far (read from other threads for metrics and tests only)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the step thread; unfinished streams end with a cancellation."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout_s)

    def __enter__(self) -> AsyncEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self) -> None:
        """Tell an idle step loop that something changed outside it (an adapter became resident)."""
        self._wakeup.set()

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)  # deque.append is atomic
        self._wakeup.set()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        adapter_key: str | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's tokens; the last output carries `finish_reason`.

        Invalid requests raise `InvalidArgument` here, before anything is streamed.
        """
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, sampling, adapter_key=adapter_key)
            except BaseException as exc:
                accepted.set_exception(exc)
                return
            self._streams[request_id] = stream
            accepted.set_result(None)

        self._submit(add)
        finished = False
        try:
            await asyncio.wrap_future(accepted)
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
                self._submit(lambda: self._abort(request_id, stream))

    def _abort(self, request_id: str, stream: _Stream) -> None:
        # Only our own request: a refused duplicate must not cancel the request that holds the id.
        if self._streams.get(request_id) is not stream:
            return
        del self._streams[request_id]
        out = self.engine.abort(request_id)
        if out is not None:
            stream.put(out)

    def _run(self) -> None:
        while not self._stopping:
            # Cleared before looking at the state, so a wake-up that arrives meanwhile is not lost.
            self._wakeup.clear()
            while self._commands:
                self._commands.popleft()()
            if not self.engine.has_unfinished():
                self._wakeup.wait(self._idle_wait_s)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
                continue
            if self.engine.last_step_tokens == 0:
                # Every request waits for an adapter: sleep until woken rather than spin.
                self._wakeup.wait(self._idle_wait_s)
                continue
            self.steps += 1
            self._deliver(outputs)
        # Requests submitted while stopping are taken in, then cancelled with the rest.
        while self._commands:
            self._commands.popleft()()
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id, stream)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, exc: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            # One exception object per consumer: raising a shared one in many tasks tangles tracebacks.
            stream.put(RuntimeError(f"engine step failed: {exc!r}"))
        self._streams.clear()
