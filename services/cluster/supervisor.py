"""Child processes of `openlora up`: started in order, each awaited until its health says SERVING, their
logs streamed with a service prefix, and all stopped (newest first, SIGTERM then SIGKILL) on Ctrl-C or as
soon as any of them dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from services.common.grpc_client import ClientTLS, health_status, open_channel
from services.common.parent_death import PARENT_PID_ENV

COLOURS = ("36", "35", "33", "32", "34", "31")


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]
    port: int
    """The gRPC port whose health decides readiness."""
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 120.0
    tls: ClientTLS | None = None
    """How to reach the child's port when it speaks TLS only."""


class ChildFailed(RuntimeError):
    pass


@dataclass
class _Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]


class Supervisor:
    def __init__(self, out: TextIO = sys.stdout, *, stop_timeout_s: float = 20.0) -> None:
        self.out = out
        self.stop_timeout_s = stop_timeout_s
        self.children: list[_Child] = []
        self._died: asyncio.Event = asyncio.Event()

    async def start(self, spec: ChildSpec) -> None:
        """Start a child and return once it reports SERVING; raise ChildFailed if it exits or times out."""
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            # The child ends with us even if we are killed before we can stop it.
            env={**os.environ, **spec.env, PARENT_PID_ENV: str(os.getpid())},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        colour = COLOURS[len(self.children) % len(COLOURS)]
        prefix = f"\x1b[{colour}m{spec.name:>12} |\x1b[0m " if self.out.isatty() else f"{spec.name:>12} | "
        child = _Child(spec, process, asyncio.create_task(self._pump(process, prefix)))
        self.children.append(child)
        await self._await_ready(child)

    async def _pump(self, process: asyncio.subprocess.Process, prefix: str) -> None:
        assert process.stdout is not None
        writing = True
        async for line in process.stdout:
            if not writing:
                continue  # still read: a child blocked on a full pipe would stall
            try:
                self.out.write(prefix + line.decode(errors="replace"))
                self.out.flush()
            except (OSError, ValueError):  # our output was closed (a pipe reader left): keep serving
                writing = False
        await process.wait()
        self._died.set()

    async def _await_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + child.spec.ready_timeout_s
        async with open_channel(f"127.0.0.1:{child.spec.port}", tls=child.spec.tls) as channel:
            while True:
                if child.process.returncode is not None:
                    raise ChildFailed(
                        f"{child.spec.name} exited with status {child.process.returncode} while starting"
                    )
                with contextlib.suppress(Exception):  # not listening yet, or still NOT_SERVING
                    if await health_status(channel, timeout=1.0) == "SERVING":
                        return
                if time.monotonic() > deadline:
                    raise ChildFailed(
                        f"{child.spec.name} was not ready after {child.spec.ready_timeout_s:.0f} s"
                    )
                await asyncio.sleep(0.2)

    async def wait_for_exit(self) -> _Child:
        """Block until some child exits; return it (the cluster is then incomplete)."""
        while True:
            await self._died.wait()
            self._died.clear()
            for child in self.children:
                if child.process.returncode is not None:
                    return child

    async def stop(self) -> None:
        """SIGTERM the children newest first (the gateway before the workers it routes to), each given
        `stop_timeout_s` to drain, then SIGKILL whatever is left."""
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.process.wait(), self.stop_timeout_s)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    await child.process.wait()
            await child.pump
