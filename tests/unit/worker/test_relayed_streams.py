"""Streams on the gateway's relay are served from the engine client's step handler: a step's chunks for
every stream are made in that one pass, one chunk per stream per write, and what a slow write holds
back goes in that stream's next chunk, bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from openlora.v1 import inference_pb2, relay_pb2
from transformers import AutoTokenizer

from services.cluster.tiny_models import build_tokenizer
from services.common.interceptors import InflightCalls
from services.inference import servicer as servicer_module
from services.inference.engine_process.client import EngineUnavailable
from services.inference.relay_server import _Link
from tests.kit.front import Front, chunk_of


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def ends(events: list[Any]) -> dict[int, int]:
    """Stream id → status code of the end events among `events`."""
    return {e.stream_id: e.end.code for e in events if e.HasField("end")}


async def test_one_step_makes_every_streams_chunk_within_the_step_handler(tokenizer: Any) -> None:
    front = Front(tokenizer)
    prompt = tokenizer.encode("hello there")
    ids = [await front.start(i, prompt, max_new_tokens=2) for i in range(3)]
    words = tokenizer.encode(" the cat")

    front.step({rid: words[:1] for rid in ids})  # no await after it: no stream task may run
    first = front.write()
    assert sorted(e.stream_id for e in first) == [0, 1, 2]
    assert [list(chunk_of(e).token_ids) for e in first] == [words[:1]] * 3

    front.step({rid: words[1:2] for rid in ids}, finished=frozenset(ids))
    last = [chunk_of(e) for e in front.write()]
    assert all(c.finish_reason == inference_pb2.LENGTH for c in last)
    assert all(c.usage.completion_tokens == 2 and c.usage.prompt_tokens == len(prompt) for c in last)
    text = tokenizer.decode(words[:2])
    assert all(chunk_of(a).text + b.text == text for a, b in zip(first, last, strict=True))
    await front.drained()
    assert ends(front.write()) == {0: grpc.StatusCode.OK.value[0], 1: 0, 2: 0}
    assert front.sent.aborted == []


async def test_tokens_of_steps_during_a_write_travel_together_in_the_next_chunk(tokenizer: Any) -> None:
    front = Front(tokenizer)
    rid = await front.start(0, tokenizer.encode("hi"), max_new_tokens=10)
    words = tokenizer.encode(" one two three four")

    front.step({rid: words[:1]})
    front.step({rid: words[1:2]})  # the first chunk is not written yet: these wait
    front.step({rid: words[2:3]})
    events, senders = front.link._take()  # the write begins; it is not done yet
    assert [list(chunk_of(e).token_ids) for e in events] == [words[:1]]
    assert front.link.events == []
    for sender in senders:
        assert sender is not None
        sender._written()  # the write completes: the held tokens leave at once, as one chunk
    (second,) = front.write()
    assert list(chunk_of(second).token_ids) == words[1:3]


async def test_a_stream_never_written_is_cancelled_once_its_buffer_is_full(tokenizer: Any) -> None:
    front = Front(tokenizer, max_buffered_tokens=4)
    rid = await front.start(0, tokenizer.encode("hi"), max_new_tokens=100)
    front.step({rid: [5]})  # its chunk goes out, and that write never completes
    for _ in range(5):
        front.step({rid: [6]})
    assert front.sent.aborted == []  # the engine is told at its next turn
    await front.drained()
    assert front.sent.aborted == [rid]
    end = [e for e in front.link.events if e.HasField("end")]
    assert [e.end.code for e in end] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert "read too slowly" in end[0].end.message


async def test_a_stop_string_ends_the_stream_at_its_token_and_aborts_the_request(tokenizer: Any) -> None:
    front = Front(tokenizer)
    rid = await front.start(0, tokenizer.encode("say"), max_new_tokens=50, stop=["world"])
    words = tokenizer.encode(" hello world and more")
    texts, finish = [], None
    for token in words:
        front.step({rid: [token]})
        for event in front.write():
            if event.chunk:
                chunk = chunk_of(event)
                texts.append(chunk.text)
                finish = chunk.finish_reason or finish
        if finish:
            break
    assert "".join(texts) == " hello "
    assert finish == inference_pb2.STOP
    await front.drained()
    assert front.sent.aborted == [rid]
    assert ends(front.write()) == {0: grpc.StatusCode.OK.value[0]}


async def test_an_engine_failure_ends_relayed_streams_unavailable_even_behind_a_write(tokenizer: Any) -> None:
    front = Front(tokenizer)
    ids = [await front.start(i, tokenizer.encode("hi"), max_new_tokens=10) for i in range(2)]
    front.step({ids[0]: [7]})  # stream 0 has a chunk waiting to be written; stream 1 has none
    front.engine._fail_streams(EngineUnavailable("the engine process exited"))
    await front.drained()
    events = front.write()
    assert [e.stream_id for e in events if e.chunk] == [0]  # the chunk first, then its end
    assert ends(events) == {0: grpc.StatusCode.UNAVAILABLE.value[0], 1: grpc.StatusCode.UNAVAILABLE.value[0]}
    assert all("engine is not serving" in e.end.message for e in events if e.HasField("end"))


async def test_a_stream_whose_chunk_cannot_be_made_fails_alone(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while making or sending one stream's chunk inside the step handler (here: building
    its message) ends that stream only; the step's other streams still get theirs."""
    to_message = servicer_module.to_message

    def failing_on_13(chunk: Any) -> Any:
        if 13 in chunk.token_ids:
            raise RuntimeError("a bug")
        return to_message(chunk)

    monkeypatch.setattr(servicer_module, "to_message", failing_on_13)
    front = Front(tokenizer)
    ids = [await front.start(i, tokenizer.encode("hi"), max_new_tokens=10) for i in range(3)]
    front.step({ids[0]: [7], ids[1]: [13], ids[2]: [7]})
    assert sorted(e.stream_id for e in front.write() if e.chunk) == [0, 2]
    await front.drained()
    assert ends(front.write()) == {1: grpc.StatusCode.INTERNAL.value[0]}
    assert front.sent.aborted == [ids[1]]  # its engine request is freed


async def test_the_relay_ends_when_its_last_stream_and_the_gateway_end_during_a_write() -> None:
    """Found by the fuzzer: both happened while a write was under way, nothing set the wake-up event
    again, and the relay call stayed open until its deadline."""

    async def serve(request: Any, context: Any, sink: Any) -> None:
        return None

    link = _Link(serve, InflightCalls(), None)
    link._push(relay_pb2.RelayEvent(stream_id=1))
    batches = link.batches()
    first = await anext(batches)  # the write is under way: the generator waits at its yield
    link._push(relay_pb2.RelayEvent(stream_id=2))  # the last stream's end event
    link.reading = False  # and the gateway half-closed, whose wake-up came before this write
    second = await asyncio.wait_for(anext(batches), 2)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(batches), 2)
    assert [e.stream_id for e in (*first.events, *second.events)] == [1, 2]
