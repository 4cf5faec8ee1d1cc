"""Starts gathered in one event-loop turn go to the worker in as many relay messages as its size
limit needs: one message over the limit would break the relay call and every stream on it."""

from __future__ import annotations

from openlora.v1 import inference_pb2, relay_pb2

from services.gateway.worker_link import _packed


def start(stream_id: int, text_bytes: int) -> tuple[relay_pb2.RelayStart, int]:
    """A start and its serialized size, as the relay call keeps them."""
    message = relay_pb2.RelayStart(
        stream_id=stream_id, request=inference_pb2.GenerateRequest(text="x" * text_bytes)
    )
    return message, message.ByteSize()


def test_starts_are_split_under_the_limit_in_order_with_the_cancels_first() -> None:
    starts = [start(i, size) for i, size in enumerate([600, 300, 300, 900, 10, 10], start=1)]
    ups = _packed(starts, [7, 8], max_bytes=1000)
    assert all(up.ByteSize() <= 1000 for up in ups)
    assert [[s.stream_id for s in up.starts] for up in ups] == [[1, 2], [3], [4, 5, 6]]
    assert list(ups[0].cancels) == [7, 8] and all(not up.cancels for up in ups[1:])


def test_few_small_starts_go_in_one_message() -> None:
    ups = _packed([start(i, 10) for i in range(5)], [], max_bytes=64 * 2**20)
    assert len(ups) == 1 and len(ups[0].starts) == 5
