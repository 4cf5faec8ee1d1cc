"""Chunks of one stream that wait for a slow client are merged into one, nothing lost or reordered."""

from __future__ import annotations

from openlora.v1 import common_pb2, inference_pb2, relay_pb2

from services.gateway.worker_link import merge


def event(chunk: inference_pb2.GenerateChunk) -> relay_pb2.RelayEvent:
    return relay_pb2.RelayEvent(
        stream_id=7,
        chunk=chunk.SerializeToString(),
        completion_tokens=len(chunk.token_ids),
        prompt_tokens=chunk.usage.prompt_tokens,
    )


def test_one_chunk_is_handed_on_unparsed() -> None:
    only = event(inference_pb2.GenerateChunk(token_ids=[1, 2], text="ab"))
    relayed = merge([only])
    assert relayed.data == only.chunk and relayed.completion_tokens == 2 and relayed.prompt_tokens == 0


def test_waiting_chunks_become_one_with_every_token_in_order_and_the_last_ones_end() -> None:
    chunks = [
        inference_pb2.GenerateChunk(token_ids=[5, 6], text="hé", logprobs=[-0.5, -0.25]),
        inference_pb2.GenerateChunk(token_ids=[7], text="llo", logprobs=[-1.0]),
        inference_pb2.GenerateChunk(
            token_ids=[8],
            text="!",
            logprobs=[-2.0],
            finish_reason=inference_pb2.LENGTH,
            usage=common_pb2.Usage(prompt_tokens=11, completion_tokens=4),
        ),
    ]
    relayed = merge([event(c) for c in chunks])
    merged = inference_pb2.GenerateChunk.FromString(relayed.data)
    assert list(merged.token_ids) == [5, 6, 7, 8]
    assert merged.text == "héllo!"
    assert list(merged.logprobs) == [-0.5, -0.25, -1.0, -2.0]
    assert merged.finish_reason == inference_pb2.LENGTH
    assert (merged.usage.prompt_tokens, merged.usage.completion_tokens) == (11, 4)
    assert (relayed.completion_tokens, relayed.prompt_tokens) == (4, 11)
