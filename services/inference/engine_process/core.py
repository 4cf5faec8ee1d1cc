"""The engine process: load the model, then step while there is work, one message out per step.

Run as `python -m services.inference.engine_process.core SPEC_JSON` by the worker's front (see
`process.py`), never by hand. Between two steps it takes every command waiting on its inbox (new
requests, aborts) in one go; after each step it sends every sequence's new tokens in one message.
A step that raises ends the process (exit 1) after a `FAILED` message: the engine's state can no
longer be trusted, and the front restarts a fresh one. The process also ends when its parent does
(Linux's parent-death signal, and a parent check while idle), so no engine outlives its worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import zmq

from services.common.errors import InvalidArgument
from services.common.parent_death import die_with_parent
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from services.inference.engine_process import protocol
from services.inference.engine_process.handoff import HandoffReader
from services.inference.engine_process.protocol import EngineInfo, NewRequest, PoolShape, SlotState

log = logging.getLogger("openlora.engine")

_IDLE_POLL_MS = 1000  # how often an idle engine checks that its parent still lives
_NO_PROGRESS_POLL_MS = 10  # a step that ran nothing (every request waits): do not spin


@dataclass(frozen=True)
class EngineSpec:
    """Everything the child needs, passed as JSON on its command line."""

    model_folder: str
    config: dict[str, Any]  # EngineConfig's fields
    inbox: str  # ZeroMQ address the engine pulls commands from
    outbox: str  # and pushes step outputs to
    torch_threads: int
    warmup: bool = True
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EngineSpec:
        return cls(**json.loads(text))

    def engine_config(self) -> EngineConfig:
        values = dict(self.config)
        values["lora_target_modules"] = tuple(values["lora_target_modules"])
        return EngineConfig(**values)


class EngineCore:
    """The step loop over sockets; testable in process with any `LLMEngine`."""

    def __init__(
        self,
        engine: LLMEngine,
        reader: HandoffReader,
        inbox: zmq.Socket[bytes],
        outbox: zmq.Socket[bytes],
        *,
        parent_pid: int | None = None,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.inbox = inbox
        self.outbox = outbox
        self.parent_pid = parent_pid
        self._stopping = False
        self._last_slots: SlotState | None = None
        self.steps = 0

    def run(self) -> None:
        """Serve until a SHUTDOWN command; raises (after telling the front) if a step fails."""
        try:
            while not self._stopping:
                self._take_commands()
                if self._stopping:
                    break
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as exc:
            log.critical("the engine failed; this engine process ends", exc_info=exc)
            with contextlib.suppress(Exception):
                self.outbox.send(protocol.pack([protocol.FAILED, repr(exc)]))
            raise

    def _take_commands(self) -> None:
        if self.engine.has_unfinished():
            timeout = 0 if self.engine.last_step_tokens else _NO_PROGRESS_POLL_MS
        else:
            timeout = _IDLE_POLL_MS
        if not self.inbox.poll(timeout):
            if timeout == _IDLE_POLL_MS:
                self._check_parent()
            return
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._apply(protocol.unpack(data))
            if self._stopping:
                return

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("the worker that started this engine is gone; exiting")
            self._stopping = True

    def _apply(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == protocol.SHUTDOWN:
            self._stopping = True
            return
        if kind != protocol.COMMANDS:
            raise ValueError(f"unknown command kind {kind!r}")
        _, adds, aborts = message
        for fields in adds:
            self._add(NewRequest.decode(fields))
        if not aborts:
            return
        taken = []
        for request_id in aborts:
            out = self.engine.abort(request_id)
            taken.append([request_id, out.prompt_tokens_taken if out is not None else 0])
        self.outbox.send(protocol.pack([protocol.ABORTED, taken]))
        if not self.engine.has_unfinished():
            self._send_step([])  # the front sees the freed KV blocks without waiting for a step

    def _add(self, request: NewRequest) -> None:
        adapter = request.adapter
        if adapter is not None:
            self.reader.learn([adapter])
        try:
            self.engine.add_request(
                request.request_id,
                request.prompt_token_ids,
                request.sampling,
                adapter_key=adapter.key if adapter is not None else None,
                after=request.after,
            )
        except InvalidArgument as exc:
            self.outbox.send(protocol.pack([protocol.REFUSED, request.request_id, exc.field, exc.problem]))
        except Exception as exc:  # one request's problem, not the engine's
            log.exception("request %s could not be added", request.request_id)
            self.outbox.send(protocol.pack([protocol.REFUSED, request.request_id, "", repr(exc)]))

    def _step(self) -> None:
        outputs = self.engine.step()
        if self.engine.last_step_tokens:
            self.steps += 1
        encoded = [
            protocol.encode_output(o.request_id, o.token_ids, o.logprobs, o.finish_reason, o.top_logprobs)
            for o in outputs
        ]
        # A prefill chunk that produced no token is still reported: ListModels and /metrics then show
        # a long prompt's request running and its KV blocks taken while its prefill goes on.
        if encoded or self.engine.last_step_tokens or not self.engine.has_unfinished():
            self._send_step(encoded)

    def _send_step(self, outputs: list[list[Any]]) -> None:
        # Stats ride on every step (a few integers), so what operators read is one step old at most.
        stats = protocol.encode_stats(self.engine.stats())
        self.outbox.send(protocol.pack([protocol.STEP, outputs, stats, self._slots_if_changed()]))

    def _slots_if_changed(self) -> list[Any] | None:
        residency = self.engine.residency
        if residency is None:
            return None
        table = residency.pool.table
        keys = tuple(str(k) for k in table.resident_keys())
        state = SlotState(
            keys, frozenset(k for k in keys if table.is_pinned(k)), table.num_free, table.evictions
        )
        if state == self._last_slots:
            return None
        self._last_slots = state
        return state.encode()


def engine_info(engine: LLMEngine, torch_threads: int) -> EngineInfo:
    pool = None
    if engine.residency is not None:
        p = engine.residency.pool
        layers = {
            path: (int(layer.lora_a.shape[2]), int(layer.lora_b.shape[1])) for path, layer in p.layers.items()
        }
        pool = PoolShape(p.r_max, p.table.num_slots, p.op_name, layers)
    return EngineInfo(
        pid=os.getpid(),
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        capacity_tokens=engine.scheduler.capacity_tokens,
        pool=pool,
        torch_threads=torch_threads,
    )


def constraint_tokenizer(model_folder: str) -> Any:
    """Output constraints need the vocabulary: the model folder's tokenizer, loaded on first use."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_folder)
    except (OSError, ValueError) as exc:
        raise InvalidArgument("response_format", f"this model has no usable tokenizer: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = EngineSpec.from_json(args[0])
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    # Ctrl-C reaches the whole process group: the worker decides when its engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s engine[{os.getpid()}] %(name)s: %(message)s",
    )
    import torch

    torch.set_num_threads(spec.torch_threads)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a step message: the front reads fast
    outbox.setsockopt(zmq.LINGER, 2000)  # a FAILED message still leaves before the exit
    inbox.connect(spec.inbox)
    outbox.connect(spec.outbox)
    reader = HandoffReader()
    started = time.perf_counter()
    try:
        engine = LLMEngine.from_pretrained(
            spec.model_folder,
            spec.engine_config(),
            tokenizer=None,  # text is the front's job
            load_tokenizer=lambda: constraint_tokenizer(spec.model_folder),
            adapter_lookup=reader.lookup,
            request_adapter=lambda key: None,  # never called: lookup finds every announced adapter
        )
        if spec.warmup:
            # Lazy initialisation (kernels, allocator) is paid here, not by the first real request.
            prompt = [i % engine.vocab_size for i in range(1, 9)]
            engine.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
    except Exception as exc:
        # The front shows this reason in its own start-up error: the operator sees why at once.
        log.exception("the engine could not load its model")
        outbox.send(protocol.pack([protocol.FAILED, f"{type(exc).__name__}: {exc}"]))
        inbox.close(linger=0)
        outbox.close()
        context.term()
        return 1
    info = engine_info(engine, torch.get_num_threads())
    log.info("engine ready in %.1fs (torch threads: %d)", time.perf_counter() - started, info.torch_threads)
    outbox.send(protocol.pack([protocol.READY, info.encode()]))
    core = EngineCore(engine, reader, inbox, outbox, parent_pid=parent)
    try:
        core.run()
    except Exception:
        return 1
    finally:
        inbox.close(linger=0)
        outbox.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
