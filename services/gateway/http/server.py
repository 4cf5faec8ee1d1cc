"""uvicorn inside the gateway's own event loop, started and stopped with the gateway.

The HTTP front shares the gRPC services' objects (key ring, limiter, worker pool, relay), so it
runs in the same loop rather than in a process or thread of its own. uvicorn's signal capture is
left off: the gateway's server kit owns SIGTERM and drains both fronts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("openlora.gateway.http")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the embedding process handles signals


class HttpServer:
    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        grace_s: float = 30.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.config = uvicorn.Config(
            app,
            log_config=None,  # the service's own logging
            access_log=False,
            lifespan="off",
            ssl_certfile=str(cert_file) if cert_file else None,
            ssl_keyfile=str(key_file) if key_file else None,
            timeout_graceful_shutdown=int(grace_s) or None,
        )
        self.server = _EmbeddedServer(self.config)
        self.port: int | None = None
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen; the bound port (a free one when asked for 0)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP by name: asyncio turns Nagle off only on sockets that say they are TCP, and an
        # SSE stream's small writes would otherwise wait for the client's delayed ACK (~40 ms each
        # request on a kept-alive connection).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host.strip("[]"), self.requested_port))
        sock.set_inheritable(True)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let responses in flight finish (up to the grace period), then close."""
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._task = None
