"""The workers setting: a static `host:port` list or one `dns:///name:port`, checked when settings load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DnsName:
    host: str
    port: int


def _split_host_port(entry: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"workers: {entry!r} is not host:port")
    return host, int(port)


def parse_workers(spec: str) -> list[str] | DnsName:
    """`host:port,host:port` (a static list) or `dns:///name:port`; ValueError naming a bad entry."""
    spec = spec.strip()
    if spec.startswith("dns:"):
        name = spec.removeprefix("dns:").lstrip("/")
        host, port = _split_host_port(name)
        return DnsName(host, port)
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("workers: give at least one host:port, or dns:///name:port")
    for entry in entries:
        _split_host_port(entry)
    return list(dict.fromkeys(entries))
