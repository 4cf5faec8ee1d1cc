"""SIGTERM drains in-flight streams before the process exits (a real server process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.kit.work_clock import WorkClock

ROOT = Path(__file__).resolve().parents[3]


def _start(delay: float, grace: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kit.scripted_inference", "--delay", str(delay), "--grace", str(grace)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(line.split()[1])


@pytest.fixture
def channel_factory() -> Iterator[list[grpc.Channel]]:
    channels: list[grpc.Channel] = []
    yield channels
    for channel in channels:
        channel.close()


def _stream(port: int, tokens: int, channels: list[grpc.Channel]) -> Iterator[inference_pb2.GenerateChunk]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    channels.append(channel)
    request = inference_pb2.GenerateRequest(
        text="drain me", sampling=common_pb2.SamplingParams(max_new_tokens=tokens)
    )
    return inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)


@pytest.mark.slow
def test_sigterm_drains_in_flight_streams(channel_factory: list[grpc.Channel]) -> None:
    proc, port = _start(delay=0.1, grace=20)
    try:
        stream = _stream(port, tokens=15, channels=channel_factory)
        first = next(stream)
        assert first.token_ids == [0]
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # let the server enter its drain

        # A new call during the drain is refused, so a client retries elsewhere.
        with pytest.raises(grpc.RpcError) as refused:
            list(_stream(port, tokens=1, channels=channel_factory))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        rest = list(stream)  # the in-flight stream runs to its end
        assert [c.token_ids[0] for c in rest[:-1]] == list(range(1, 15))
        assert rest[-1].finish_reason == inference_pb2.LENGTH
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    logs = proc.stderr.read()
    assert "draining 1 call(s)" in logs and "scripted stopped" in logs


@pytest.mark.slow
def test_streams_past_the_grace_period_are_cancelled(channel_factory: list[grpc.Channel]) -> None:
    proc, port = _start(delay=0.2, grace=1.0)
    try:
        stream = _stream(port, tokens=1000, channels=channel_factory)
        next(stream)
        started = WorkClock()
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut:
            list(stream)
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert proc.wait(timeout=15) == 0
        assert started.elapsed() < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
