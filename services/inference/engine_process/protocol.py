"""The messages between a worker's front and its engine process: msgpack, plain lists, no pickles.

Front → engine, one message per event-loop turn: `[COMMANDS, adds, aborts]` or `[SHUTDOWN]`.
Engine → front: `[READY, info]` once, then one `[STEP, outputs, stats, slots]` per engine step (and
when it goes idle), `[REFUSED, request_id, field, message]` for a request it could not take,
`[ABORTED, [[request_id, prompt_tokens_taken], ...]]` answering each command's aborts (how much of
each prompt it had taken in: the front bills that prefill to a request cancelled before its first
token), and `[FAILED, reason]` right before it exits on an error.

Lists rather than maps keep each step's message small and cheap to pack: a step of 64 decodes is
64 short lists of ids. Nothing here is pickled, so neither side runs code the other sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from services.inference.engine.llm_engine import EngineStats
from services.inference.engine.output_format import Constraint
from services.inference.engine.sequence import FinishReason, SamplingParams, TopLogprobs

COMMANDS = 0
SHUTDOWN = 1
READY = 2
STEP = 3
REFUSED = 4
FAILED = 5
ABORTED = 6

_FINISH_CODES = {None: 0, FinishReason.STOP: 1, FinishReason.LENGTH: 2, FinishReason.CANCELLED: 3}
_FINISH_OF_CODE = {code: reason for reason, code in _FINISH_CODES.items()}


def pack(message: list[Any]) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def unpack(data: bytes) -> list[Any]:
    message = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    if not isinstance(message, list) or not message:
        raise ValueError(f"not an engine message: {message!r:.80}")
    return message


@dataclass(frozen=True)
class AdapterHandle:
    """Where the engine finds an adapter's weights: a handoff file the front wrote (see handoff.py)."""

    key: str
    path: str
    rank: int
    scaling: float


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterHandle | None = None
    after: str | None = None
    """Another sample of the same prompt, admitted once this one's prefill is cached (n > 1)."""

    def encode(self) -> list[Any]:
        s = self.sampling
        sampling = [
            s.temperature,
            s.top_p,
            s.top_k,
            s.seed,
            s.max_new_tokens,
            list(s.stop_token_ids),
            s.ignore_eos,
            s.logprobs,
            s.top_logprobs,
            s.frequency_penalty,
            s.presence_penalty,
            s.repetition_penalty,
            s.min_p,
            [list(pair) for pair in s.logit_bias],
            s.constraint.encode() if s.constraint is not None else None,
        ]
        a = self.adapter
        adapter = [a.key, a.path, a.rank, a.scaling] if a is not None else None
        return [self.request_id, self.prompt_token_ids, sampling, adapter, self.after]

    @classmethod
    def decode(cls, fields: list[Any]) -> NewRequest:
        request_id, prompt, s, a, after = fields
        # Stop strings never travel: the front, which holds the tokenizer, applies them.
        sampling = SamplingParams(
            temperature=s[0],
            top_p=s[1],
            top_k=s[2],
            seed=s[3],
            max_new_tokens=s[4],
            stop_token_ids=tuple(s[5]),
            ignore_eos=s[6],
            logprobs=s[7],
            top_logprobs=s[8],
            frequency_penalty=s[9],
            presence_penalty=s[10],
            repetition_penalty=s[11],
            min_p=s[12],
            logit_bias=tuple((int(t), float(b)) for t, b in s[13]),
            constraint=Constraint.decode(s[14]) if s[14] is not None else None,
        )
        adapter = AdapterHandle(a[0], a[1], a[2], a[3]) if a is not None else None
        return cls(request_id, prompt, sampling, adapter, after)


def encode_output(
    request_id: str,
    token_ids: list[int],
    logprobs: list[float],
    finish: FinishReason | None,
    top_logprobs: list[TopLogprobs] | None = None,
) -> list[Any]:
    """`[request_id, token_ids, logprobs, finish]`, plus the top alternatives only when asked for
    (most steps carry none, and every byte of a step message is paid once per token)."""
    if top_logprobs:
        return [request_id, token_ids, logprobs, _FINISH_CODES[finish], top_logprobs]
    return [request_id, token_ids, logprobs, _FINISH_CODES[finish]]


def finish_reason(code: int) -> FinishReason | None:
    return _FINISH_OF_CODE[code]


def encode_stats(stats: EngineStats) -> list[Any]:
    return [
        stats.num_running,
        stats.num_waiting,
        stats.num_kv_blocks,
        stats.num_free_kv_blocks,
        stats.num_cached_kv_blocks,
        stats.prefix_cache_hit_blocks,
        stats.num_preemptions,
        stats.kv_cache_bytes,
        stats.attention_backend,
    ]


def decode_stats(fields: list[Any]) -> EngineStats:
    return EngineStats(*fields)


@dataclass(frozen=True)
class SlotState:
    """The engine's LoRA slots as last reported, answering what the front asks of a `SlotTable`."""

    resident: tuple[str, ...] = ()  # least recently used first
    pinned: frozenset[str] = frozenset()
    num_free: int = 0
    evictions: int = 0

    def encode(self) -> list[Any]:
        return [list(self.resident), sorted(self.pinned), self.num_free, self.evictions]

    @classmethod
    def decode(cls, fields: list[Any]) -> SlotState:
        return cls(tuple(fields[0]), frozenset(fields[1]), fields[2], fields[3])

    def resident_keys(self) -> list[str]:
        return list(self.resident)

    def is_pinned(self, key: object) -> bool:
        return key in self.pinned

    def slot_of(self, key: str) -> int | None:
        return self.resident.index(key) if key in self.resident else None


@dataclass(frozen=True)
class PoolShape:
    """What the front checks an adapter against before the engine sees it: the LoRA slots' shape."""

    r_max: int
    num_slots: int
    op_name: str
    layers: dict[str, tuple[int, int]]  # module path -> (d_in, d_out)

    @property
    def target_modules(self) -> set[str]:
        return {name.rsplit(".", 1)[-1] for name in self.layers}


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once its model is loaded."""

    pid: int
    vocab_size: int
    max_model_len: int
    capacity_tokens: int
    pool: PoolShape | None
    torch_threads: int

    def encode(self) -> dict[str, Any]:
        pool = None
        if self.pool is not None:
            p = self.pool
            pool = {"r_max": p.r_max, "num_slots": p.num_slots, "op_name": p.op_name, "layers": p.layers}
        return {
            "pid": self.pid,
            "vocab_size": self.vocab_size,
            "max_model_len": self.max_model_len,
            "capacity_tokens": self.capacity_tokens,
            "pool": pool,
            "torch_threads": self.torch_threads,
        }

    @classmethod
    def decode(cls, fields: dict[str, Any]) -> EngineInfo:
        p = fields["pool"]
        pool = None
        if p is not None:
            layers = {path: (int(shape[0]), int(shape[1])) for path, shape in p["layers"].items()}
            pool = PoolShape(p["r_max"], p["num_slots"], p["op_name"], layers)
        return cls(
            fields["pid"],
            fields["vocab_size"],
            fields["max_model_len"],
            fields["capacity_tokens"],
            pool,
            fields["torch_threads"],
        )
