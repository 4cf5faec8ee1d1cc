"""Free loopback ports for servers started by tests.

Ports come from below the kernel's ephemeral range: a port the OS hands out for `bind(0)` is also
the kind it gives every outgoing connection as its source port, so between a test picking one and a
server binding it, a client connection elsewhere could take it ("address already in use", seen in a
suite run). Below that range only listeners live, and this process never hands out one port twice.
"""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

_LOWEST = 20000
_handed_out: set[int] = set()


@functools.cache  # the kernel's range does not change during a test run
def _candidate_range() -> tuple[int, int] | None:
    """Ports below the ephemeral range, or None where it cannot be read or leaves too few."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (_LOWEST, ephemeral_low - 1) if ephemeral_low - _LOWEST >= 1000 else None


def _bindable(host: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bind it soon)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports, all held open until every one is picked."""
    span = _candidate_range()
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            if span is None:
                sock = _bindable(host, 0)
            else:
                if len(_handed_out) > (span[1] - span[0]) // 2:
                    _handed_out.clear()  # a very long session: reuse, as the OS would
                port = random.randint(*span)
                sock = None if port in _handed_out else _bindable(host, port)
            if sock is not None:
                _handed_out.add(int(sock.getsockname()[1]))
                sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()
