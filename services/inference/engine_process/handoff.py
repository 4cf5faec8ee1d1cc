"""Adapter weights from the front to the engine process through files, never through the socket.

The front writes each adapter it hands the engine once, as one flat file: an 8-byte header length,
a JSON header (rank, scaling, each module's A and B offsets and shapes), then float32 data at
64-byte aligned offsets. The engine maps the file and views the tensors in place when it writes
the adapter into a device slot, so nothing is pickled or copied twice on the way. The directory
is tmpfs (`/dev/shm`) by default, so the file is shared memory in effect.

A file lives while its adapter is in the front's host tier: a request pins its adapter there for
its whole life, so the engine never looks for a file that was taken away. `sweep` removes the files
of adapters the host tier has let go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.inference.engine_process.protocol import AdapterHandle

log = logging.getLogger("openlora.worker.handoff")

_ALIGN = 64
_MAGIC = b"OLAH1\0\0\0"


def default_handoff_root() -> Path:
    """tmpfs when the machine has a writable one, else the system's temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def write_adapter_file(
    path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scaling: float
) -> None:
    """Write atomically (temporary name, then rename): the engine never sees half a file."""
    tensors: dict[str, list[object]] = {}
    blobs: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for module, pair in sorted(weights.items()):
        entry: list[object] = []
        for tensor in pair:
            data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
            entry.append([offset, list(data.shape)])
            blobs.append((offset, data))
            offset = _aligned(offset + data.numel() * 4)
        tensors[module] = entry
    header = json.dumps({"rank": rank, "scaling": scaling, "tensors": tensors}).encode()
    data_start = _aligned(len(_MAGIC) + 8 + len(header))
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        out.write(_MAGIC + struct.pack("<Q", len(header)) + header)
        for start, tensor in blobs:
            out.seek(data_start + start)
            out.write(tensor.numpy().tobytes())
        out.truncate(data_start + offset)
    os.replace(partial, path)


def read_adapter_file(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """The adapter's (weights, rank, scaling), viewing the mapped file (read it, do not keep it)."""
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError(f"{path} is not an adapter handoff file")
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        size = os.fstat(f.fileno()).st_size
    header_end = len(_MAGIC) + 8 + header_len
    mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    data_start = _aligned(header_end)
    weights = {}
    for module, pair in header["tensors"].items():
        views = []
        for start, shape in pair:
            count = 1
            for dim in shape:
                count *= dim
            begin = data_start + start
            views.append(mapped[begin : begin + count * 4].view(torch.float32).view(shape))
        weights[module] = (views[0], views[1])
    return weights, int(header["rank"]), float(header["scaling"])


class HandoffWriter:
    """The front's side: one file per adapter key in a private directory, removed when let go."""

    def __init__(self, root: Path | None = None) -> None:
        base = root or default_handoff_root()
        base.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="openlora-adapters-", dir=base))
        self._published: dict[str, AdapterHandle] = {}
        self._lock = threading.Lock()  # publish runs in worker threads, sweep on the event loop

    def path_of(self, key: str) -> Path:
        # Keys hold characters a file name should not (a source URI's slashes): name by digest.
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".adapter")

    def published(self, key: str) -> AdapterHandle | None:
        return self._published.get(key)

    def publish(
        self, key: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scaling: float
    ) -> AdapterHandle:
        """The adapter's handle, writing its file the first time (blocking: call off the event loop)."""
        with self._lock:
            handle = self._published.get(key)
            if handle is not None:
                return handle
            path = self.path_of(key)
            write_adapter_file(path, weights, rank, scaling)
            handle = AdapterHandle(key, str(path), rank, scaling)
            self._published[key] = handle
            return handle

    def sweep(self, keep: Callable[[str], bool]) -> int:
        """Remove the files of adapters `keep` no longer wants; the number removed."""
        with self._lock:
            gone = [key for key in self._published if not keep(key)]
            for key in gone:
                handle = self._published.pop(key)
                Path(handle.path).unlink(missing_ok=True)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            for handle in self._published.values():
                Path(handle.path).unlink(missing_ok=True)
            self._published.clear()
            for leftover in self.directory.glob("*"):
                leftover.unlink(missing_ok=True)
        self.directory.rmdir()


@dataclass
class HandoffReader:
    """The engine's side: adapter key → handle, told with each request; read when a slot needs it."""

    handles: dict[str, AdapterHandle]

    def __init__(self) -> None:
        self.handles = {}

    def learn(self, handles: Iterable[AdapterHandle]) -> None:
        for handle in handles:
            self.handles[handle.key] = handle

    def lookup(self, key: str) -> _MappedAdapter:
        handle = self.handles.get(key)
        if handle is None:
            # Every request arrives with its adapter's handle: a key without one is a front bug.
            raise RuntimeError(f"no handoff file was announced for adapter {key}")
        weights, rank, scaling = read_adapter_file(handle.path)
        return _MappedAdapter(weights, rank, scaling)


@dataclass(frozen=True)
class _MappedAdapter:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scaling: float
