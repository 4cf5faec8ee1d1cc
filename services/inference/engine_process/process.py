"""One engine child process and the two ZeroMQ sockets the front keeps to it.

Each start gets sockets of its own (fresh `ipc://` names), so nothing queued for a dead engine
reaches its successor. The front binds, the child connects; messages from the child are handed to
`on_message` on the event loop, all that are waiting at once. A thread waits for the child's exit
and reports it on the event loop, however it ended (a crash, SIGKILL, the OOM killer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from services.inference.engine_process import protocol
from services.inference.engine_process.core import EngineSpec

log = logging.getLogger("openlora.worker.engine_process")


class EngineProcess:
    def __init__(
        self,
        spec: Callable[[str, str], EngineSpec],
        runtime_dir: Path,
        generation: int,
        *,
        env: dict[str, str],
        on_message: Callable[[list[Any]], None],
        on_exit: Callable[[EngineProcess, int], None],
    ) -> None:
        """`spec(inbox, outbox)` builds the child's spec around this start's socket addresses."""
        self.generation = generation
        self._inbox_address = f"ipc://{runtime_dir}/engine-{generation}-in"
        self._outbox_address = f"ipc://{runtime_dir}/engine-{generation}-out"
        self._spec = spec(self._inbox_address, self._outbox_address)
        self._env = env
        self._on_message = on_message
        self._on_exit = on_exit
        self._context = zmq.asyncio.Context.instance()
        self._commands: zmq.Socket[bytes] | None = None
        self._outputs: zmq.asyncio.Socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.returncode: int | None = None
        self.failure: str | None = None
        """What this engine said before it exited on an error (its FAILED message), if anything."""

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A plain socket for sending: a PUSH with no high-water mark never blocks the event loop.
        self._commands = zmq.Context.instance().socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(self._inbox_address)
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.LINGER, 0)
        self._outputs.bind(self._outbox_address)
        command = [sys.executable, "-m", "services.inference.engine_process.core", self._spec.to_json()]
        self._popen = subprocess.Popen(command, env=self._env, stdin=subprocess.DEVNULL)
        log.info("engine process %d started (generation %d)", self._popen.pid, self.generation)
        self._reader = loop.create_task(self._read(), name=f"engine-{self.generation}-outputs")
        popen = self._popen

        def wait_for_exit() -> None:
            code = popen.wait()
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                loop.call_soon_threadsafe(self._exited, code)

        threading.Thread(target=wait_for_exit, name=f"engine-{self.generation}-exit", daemon=True).start()

    async def _read(self) -> None:
        assert self._outputs is not None
        outputs = self._outputs
        while True:
            data = await outputs.recv()
            self._deliver(data)
            while True:  # everything else already waiting, in this same turn
                try:
                    data = outputs.recv(zmq.NOBLOCK).result()  # type: ignore[attr-defined]
                except zmq.Again:
                    break
                self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        message = protocol.unpack(data)
        if message[0] == protocol.FAILED:
            self.failure = str(message[1])
        self._on_message(message)

    def _exited(self, code: int) -> None:
        self.returncode = code
        # Messages sent just before the exit (a FAILED reason, last outputs) are still read.
        self._drain_outputs()
        self._close_sockets()
        self._on_exit(self, code)

    def _drain_outputs(self) -> None:
        if self._outputs is None:
            return
        while True:
            try:
                data = self._outputs.recv(zmq.NOBLOCK).result()  # type: ignore[attr-defined]
            except (zmq.Again, zmq.ZMQError):
                return
            with contextlib.suppress(Exception):
                self._deliver(data)

    def send(self, message: list[Any]) -> None:
        if self._commands is None:
            return  # the engine is gone: its requests were failed already
        self._commands.send(protocol.pack(message), zmq.NOBLOCK)

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    async def stop(self, timeout_s: float) -> None:
        """Ask the engine to exit; kill it if it has not within `timeout_s`."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                self.send([protocol.SHUTDOWN])
            try:
                await asyncio.wait_for(asyncio.to_thread(self._popen.wait), timeout_s)
            except TimeoutError:
                log.warning(
                    "engine process %d did not stop within %.0fs; killing it", self._popen.pid, timeout_s
                )
                self.kill()
                await asyncio.to_thread(self._popen.wait)
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        for socket in (self._commands, self._outputs):
            if socket is not None:
                socket.close(linger=0)
        self._commands = None
        self._outputs = None
        for address in (self._inbox_address, self._outbox_address):
            with contextlib.suppress(OSError):
                os.unlink(address.removeprefix("ipc://"))
