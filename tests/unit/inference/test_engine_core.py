"""The engine process's step loop over real sockets, in this process: one message per step, refusals
per request, and a failed step that tells the front before it ends the loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from services.inference.engine_process import protocol
from services.inference.engine_process.core import EngineCore
from services.inference.engine_process.handoff import HandoffReader
from services.inference.engine_process.protocol import NewRequest


class Sockets:
    def __init__(self, name: str) -> None:
        self.context = zmq.Context()
        self.commands = self.context.socket(zmq.PUSH)
        self.commands.bind(f"inproc://{name}-in")
        self.outputs = self.context.socket(zmq.PULL)
        self.outputs.bind(f"inproc://{name}-out")
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.connect(f"inproc://{name}-in")
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.connect(f"inproc://{name}-out")

    def send(self, message: list[Any]) -> None:
        self.commands.send(protocol.pack(message))

    def receive(self) -> list[Any]:
        assert self.outputs.poll(10_000), "no message from the engine within 10 s"
        return protocol.unpack(self.outputs.recv())

    def close(self) -> None:
        for socket in (self.commands, self.outputs, self.inbox, self.outbox):
            socket.close(linger=0)
        self.context.term()


@pytest.fixture
def sockets(request: pytest.FixtureRequest) -> Iterator[Sockets]:
    pair = Sockets(request.node.name)
    yield pair
    pair.close()


def add(request_id: str, prompt: list[int], n: int) -> list[Any]:
    return NewRequest(request_id, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True)).encode()


def start(engine: LLMEngine, sockets: Sockets) -> tuple[EngineCore, threading.Thread, list[BaseException]]:
    core = EngineCore(engine, HandoffReader(), sockets.inbox, sockets.outbox)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            core.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return core, thread, errors


def test_each_step_is_one_message_with_every_sequence(tiny_llama_dir: Path, sockets: Sockets) -> None:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 21))
    core, thread, errors = start(engine, sockets)
    sockets.send(
        [protocol.COMMANDS, [add("a", [3, 4, 5], 5), add("b", [6, 7], 5), add("bad", [10**6], 1)], []]
    )
    got: dict[str, list[int]] = {"a": [], "b": []}
    refused = []
    finished: set[str] = set()
    while finished != {"a", "b"}:
        message = sockets.receive()
        if message[0] == protocol.REFUSED:
            refused.append(message[1:])
            continue
        assert message[0] == protocol.STEP
        ids = [o[0] for o in message[1]]
        assert len(ids) == len(set(ids)), "one output per sequence per step"
        for request_id, token_ids, _, finish in message[1]:
            got[request_id] += token_ids
            if finish:
                finished.add(request_id)
        assert message[2] is not None  # stats ride on every step
    assert refused == [["bad", "token_ids", refused[0][2]]]
    want = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 21)).generate(
        [[3, 4, 5], [6, 7]], SamplingParams(max_new_tokens=5, ignore_eos=True)
    )
    assert [got["a"], got["b"]] == want
    sockets.send([protocol.SHUTDOWN])
    thread.join(10)
    assert not thread.is_alive() and not errors and core.steps >= 5


def test_an_abort_frees_the_request_and_reports_it(tiny_llama_dir: Path, sockets: Sockets) -> None:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 21))
    _, thread, errors = start(engine, sockets)
    sockets.send([protocol.COMMANDS, [add("long", [3, 4, 5], 1000)], []])
    assert sockets.receive()[0] == protocol.STEP
    sockets.send([protocol.COMMANDS, [], ["long", "unknown"]])
    answers = []
    while True:  # steps already under way may still arrive; then the answer and the idle report
        message = sockets.receive()
        if message[0] == protocol.ABORTED:
            answers.append(message[1])
            continue
        stats = protocol.decode_stats(message[2])
        if not message[1] and stats.num_running == 0:
            break
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    # The whole prompt was taken in (it produced tokens); an id the engine does not know took none.
    assert answers == [[["long", 3], ["unknown", 0]]]
    sockets.send([protocol.SHUTDOWN])
    thread.join(10)
    assert not errors


def test_a_failed_step_tells_the_front_and_ends_the_loop(
    tiny_llama_dir: Path, sockets: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 21))

    def broken_step() -> list[Any]:
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine, "step", broken_step)
    _, thread, errors = start(engine, sockets)
    sockets.send([protocol.COMMANDS, [add("a", [3, 4, 5], 5)], []])
    message = sockets.receive()
    assert message[0] == protocol.FAILED and "injected step failure" in message[1]
    thread.join(10)
    assert not thread.is_alive() and isinstance(errors[0], RuntimeError)
